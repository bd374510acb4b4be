"""FID pipeline (imports nothing from adv_diffusion): weights, network, preprocessing, metrics.

inception (Flax FID Inception-v3 + torch-free weight loader), convert_inception (CLI, torch),
preprocess (resize rules), features (sharded extraction), fid (statistics, Fréchet distance),
inception_score (Inception Score), precision_recall (k-NN precision/recall), kid (Kernel
Inception Distance), metrics (end-to-end evaluation with provenance), errors (EvaluationError and input checks); lpips (Flax LPIPS-VGG, the
consistency-model distance, + torch-free loader) and convert_lpips (CLI, torch).
"""
