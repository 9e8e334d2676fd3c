"""Symmetry training before and after the move to the shared training loop, on the same 8 mm scans.

Twelve noisy copies of the template on the 8 mm model grid (8 training, 2 validation, 2 held-out scans), lesions of
2000-16000 mm^3, at most EPOCHS epochs; prints the best epoch, the validation AUC and the AUC of 6 simulated lesions
per held-out scan and bin against the clean held-out scans. Runs against whichever bids_siamese is on the path
(the old API with its own TrainConfig, or the shared loop), so the two can be compared:

    PYTHONPATH=OLD_CHECKOUT python benchmarks/symmetry_loop_check.py SEED EPOCHS
    PYTHONPATH=NEW_CHECKOUT python benchmarks/symmetry_loop_check.py SEED EPOCHS
"""
import sys, time
import numpy as np, torch
from bids_siamese.resources import model_grid
from bids_siamese.symmetry.simulate import LesionConfig
import bids_siamese.symmetry.train as T
from bids_siamese.symmetry.scans import prepare_scan
new = hasattr(T, "train_config")
if new:
    from bids_siamese.preproc.grid import template_on_grid
    data, mask = template_on_grid(model_grid(8.0))
else:
    from bids_siamese.symmetry.asymmetry import template_on_model_grid
    data, mask = template_on_model_grid(8.0)
med = np.median(data[mask]); q75, q25 = np.percentile(data[mask], [75, 25])
data = np.where(mask, (data - med) / (q75 - q25), 0).astype(np.float32)
seed = int(sys.argv[1]); epochs = int(sys.argv[2])
rng = np.random.default_rng(100)
scans = [prepare_scan(np.where(mask, data + rng.normal(0, 0.1, data.shape), 0).astype(np.float32), mask, 8.0, f"s{i}") for i in range(12)]
lesion = LesionConfig(volume_mm3=(2000.0, 16000.0))
torch.set_num_threads(1)
t = time.time()
if new:
    from bids_siamese.train.loop import TrainConfig
    from bids_siamese.symmetry.model import build_symmetry_model
    cfg = TrainConfig(epochs=epochs, batch_size=8, seed=seed, flip_lr=True, patience=5)
    torch.manual_seed(seed)
    m = build_symmetry_model("small", "difference", 64, difference_channel=True)
    res, info = T.train_symmetry_model(m, scans[:8], scans[8:10], cfg, 8.0, lesion)
    model = res.model
else:
    cfg = T.TrainConfig(resolution=8.0, epochs=epochs, batch_size=8, seed=seed, lesion=lesion)
    model, hist, info = T.train_symmetry_model(scans[:8], scans[8:10], cfg, log=lambda s: None)
secs = time.time() - t
_, per_bin, overall = T.evaluate_detection(scans[10:], 8.0, {"p": T.siamese_scorer(model, 8.0, 8.0)}, {"p": info["threshold"]}, lesion,
                                          bins=(2000.0, 4000.0, 8000.0, 16000.0), draws=6, seed=7)
print(f"{'new' if new else 'old'} seed {seed}: best epoch {info['best_epoch']}/{info['epochs_run']}, val AUC {info['best_val_auc']:.3f}, "
      f"held-out AUC {overall.loc[0, 'auc']:.3f}, {secs:.0f} s")
