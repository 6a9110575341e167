"""``edge-export evaluate``: site validation of a bundle on labelled studies."""
