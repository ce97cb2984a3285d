"""The reference backend: plain torch ops. It is the ground truth every other backend is tested against."""
