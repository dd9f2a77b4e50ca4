"""Environment adapters: the built-in Lift task (robosuite) and LIBERO (extra ``libero``)."""
