"""fewclip's Hydra configuration tree, shipped inside the distribution as the package ``fewclip.conf``.

Only the YAML files matter; this file makes the folder a package so that ``importlib.resources`` finds it in
editable and wheel installs alike (``fewclip.config.conf_dir``).
"""
