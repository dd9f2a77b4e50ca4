"""Real robots: the driver contract, the safety envelope, the operator and the control loop.

Every module here imports only the standard library, numpy and (for config files) yaml: the same
code runs on a robot's own computer inside a thin client that has no torch, Ray or model code
(openpi's lesson: the robot side stays thin, and safety never waits on the network). Importing
this package imports nothing else; import the module you need. See README.md.
"""
