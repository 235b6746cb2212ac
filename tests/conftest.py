import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests import trb.py and the scripts from the root


def relative_weight_error(a, b):
    """
    The largest ||a[k] - b[k]|| / ||a[k]|| over the tensors of two state dicts (float64). Per tensor, not per element:
    AdamW's update is lr * g / (|g| + eps), so for a weight whose gradient is far below eps (1e-8) it multiplies the
    gradient's rounding error by lr / eps (5e4 at lr 5e-4). Two runs that sum gradients in another order then differ
    in a few isolated elements by ~1e-6 absolute, while the tensors agree to ~1e-7.
    """
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / a[k].double().norm()) for k in a)
