"""Real robots: the drivers, the safety envelope and control loop on the robot's side, and the gateway through which a
robot that cannot join the Ray cluster reaches the job's policy and replay (gRPC, msgpack-numpy payloads, a bearer
token per robot). See README.md here; nothing is imported at package level, so a robot host that only needs the thin
client (``actors.robots.client``) never loads the training stack.
"""
