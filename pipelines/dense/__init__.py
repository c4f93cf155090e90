"""Dense prediction from cached maps: semantic segmentation, depth and open-vocabulary
segmentation probes, scored against the per-pixel targets stored beside the images table.

Layers: `metrics` (pure numpy), `heads` (torch modules), `train` (streamed training and
prediction), `runner` (store in, results out), `openvocab` (seen/unseen classes in text space)."""
