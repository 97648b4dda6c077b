"""Registration: affine (world space), instance optimisation, network inference and the
pipeline (affine -> deformable -> warp) that returns transforms fast; metrics only on request."""
