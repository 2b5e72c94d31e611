"""Learning: the experiment config (arcface_torch style), the training loop, site calibration (fit
thresholds and AS-norm on a site's labelled images) and site adaptation (fine-tune there, prove it on
held-back patients). The top floor of ``models``: it uses data, net, scoring and evaluation."""
