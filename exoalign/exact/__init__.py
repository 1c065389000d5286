"""The exact-optimum benchmark (``exoalign bench exact``): every method against π*_β on an enumerable task."""
