"""`posebert predict`: 3D poses of the person in ordinary videos (:mod:`.run` says what it
writes; :mod:`.track` decodes and detects, :mod:`.lifters` lifts, :mod:`.render` draws)."""
