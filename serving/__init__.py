"""The tritonserver process: its flags and launch (`tritonserver.py`), the supervisor that
keeps it healthy (`supervisor.py`, with what /proc says in `procfs.py` and the admin API
in `admin.py`), and the commands around it: `serve.py` (`make serve`, the container's
entry point: signals and drain) and `demo.py` (`make demo`).
"""
