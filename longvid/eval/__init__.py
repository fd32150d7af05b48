"""Weight-free quality metrics for long videos: frame differences and flicker, temporal spectrum, optical-flow
warp error, window seams, sharpness and colour drift, and repetition (see docs/metrics.md).

They need only numpy (the flow metrics also OpenCV, ``pip install 'longvid[metrics]'``) and stream the video
once at a reduced size, so a long 480p clip takes seconds on one CPU core.
"""
