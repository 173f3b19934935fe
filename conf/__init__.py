"""difflab's Hydra config tree, importable so Hydra finds it as pkg://difflab.conf (src/difflab/conf links here)."""
