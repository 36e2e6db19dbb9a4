"""Server-side library of the VISTA3D MONAI Label app."""
