"""Kinematic WidowX 250 6DOF simulator: kinematics, tabletop scene, camera rendering, task suite, scripted expert.

No GPU and no GL: numpy and PIL only. The arm is an ordinary `Arm` driver (`world.SimArm`), so the
safety limiter and `Arm.execute` stand between every action and the simulated motors, as on the
real robot. Ground-truth task checks live in `tasks` and are for evaluation only.
"""
