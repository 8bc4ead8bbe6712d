"""The product: stamping photo files as stamp.py does, judging them as scan.py does, and the stage of evaluate.py
that measures both through the platforms' pipelines (stamping, files, scanning, pipelines, stage)."""
