"""Arm and camera interfaces, their drivers (Interbotix, RealSense, folder) and the simulator's."""
