"""Real robots: the driver contract, the safety envelope, the operator and the control loop on the robot's
side, and the gateway through which a robot that cannot join the Ray cluster reaches the job's policy and
replay (gRPC, msgpack-numpy payloads, a bearer token per robot).

The robot-side modules and the thin client (``actors.robots.client``) import only the standard library,
numpy, msgpack, grpcio and (for config files) yaml: the same code runs on a robot's own computer, which has
no torch, Ray or model code (openpi's lesson: the robot side stays thin, and safety never waits on the
network). Importing this package imports nothing else; import the module you need. See README.md.
"""
