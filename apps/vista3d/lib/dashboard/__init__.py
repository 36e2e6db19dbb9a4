"""The team dashboard (``/dashboard/``): is the model learning, who labelled what, what needs labelling next.

Built only from what the server already keeps: the model store's manifest (:mod:`.learning`), the
datastore's label and image info (:mod:`.work`, :mod:`.next_up`), the scheduler and the running
training task. :mod:`.figures` joins them into the JSON ``/dashboard/data`` answers, scoped to what
the viewer may see; :mod:`.page` renders the same figures as a page with server-drawn SVG plots
(:mod:`.plots`), so it needs no script from anywhere and works offline.
"""
