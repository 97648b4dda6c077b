"""Training: config, data (real scans, synthetic label-map pairs), augmentation, objective,
the one training loop with exact resume and DDP, and preprocessing of training scans."""
