"""Fake vendor modules (Interbotix's ROS 2 API, pyrealsense2) with the real APIs' shape and failure modes.

Each fake is installed into `sys.modules` by a test fixture (monkeypatch.setitem), so the drivers'
lazy `import` finds it exactly where it would find the real package.
"""
