"""Test doubles for code built on the runtime, shared by the project's tests and benchmarks.

- `policies`: policies at the `Policy` interface that need no model (scripted, blocking, rule-based);
- `gemini_server`: a local stand-in for the Gemini API that the real google-genai client talks to;
- `daemon_process`: the daemon as a subprocess under a fake systemd (`fake_daemon` is its entry point,
  the product's daemon on the simulator with a scripted policy);
- `models`: real and tiny Gemma-3 GGUF models and bundles, built once and cached (the build needs the
  `convert` extra).

They live in the package, not in tests/, because bench/ uses them too (the reliability suite drives the
daemon process and the fake Gemini server; the step-latency bench loads the tiny vision model), and
because someone testing their own driver, verifier or API client against the runtime wants the same
doubles. Nothing in runtime/, train/ or convert/ imports this package.
"""
