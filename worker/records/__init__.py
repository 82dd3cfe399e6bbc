"""Records: what operators write in YAML, loaded and checked.

YAML sources with file:line errors, account records resolved against provider presets and
advanced keys, auth profiles, keystores, secrets, and the loader that reads them all
(:mod:`worker.records.loader`). The bottom layer: it imports nothing of the others, not even
mail; the checks of the signing keys a record names are here (:mod:`worker.records.signing_material`).
"""
