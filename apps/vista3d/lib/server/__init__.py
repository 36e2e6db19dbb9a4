"""The serving edge: sign-in, the route -> role table, request checks, scheduling; around MONAI Label's server.

Started as ``monailabel start_server ... --uvicorn_app lib.server.asgi:app`` (``make serve``). The
segmentation core never imports this package; it hands inward plain values (a user name).
"""
