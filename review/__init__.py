"""Label review: score each training image's annotation against a model's probabilities, flag
the suspected errors per pixel, and write what a person needs to act on them (`scores.csv`,
issue and corrected masks, a static page, Label Studio and CVAT imports).

`scores.py` the per-image and per-pixel measures (torch, on the model's device), `sources.py`
where probabilities come from (a run directory; the ONNX source lives in `noisyseg.export`),
`runner.py` the streaming pass and its outputs, `page.py` the HTML page, `label_studio.py` and
`coco.py` the two relabelling formats, `colors.py` how masks are drawn.
"""
