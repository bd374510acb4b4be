"""Every configuration key of the codebase, each with a one-line comment.

Experiment files (``configs/<name>.py``) start from ``get_config()`` here and override what
they change. Any key can be overridden on the command line: ``--config.train.batch_size=64``.
Values are checked at start-up by ``modes.config_validation.validate_config``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # root PRNG seed; every key of the run derives from it by fold_in
  config.mode = "train"  # what main.py runs when --mode is not given (a key of modes.MODES)

  # ---- data -----------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"  # "digits" (embedded, scikit-learn) | "cifar10" | "imagenet64" (TFDS)
  data.data_dir = ""  # TFDS data directory; "" = TFDS default (~/tensorflow_datasets)
  data.split = "train"  # dataset split used for training
  data.image_size = (
      16  # image side in pixels; must match the dataset (digits: 16, cifar10: 32, imagenet64: 64)
  )
  data.channels = 1  # image channels; must match the dataset (digits: 1, else 3)
  data.num_classes = 0  # >0 makes the model class-conditional (digits: 10, imagenet64: 1000)
  data.random_flip = False  # random horizontal flip, drawn per example inside the train step

  # ---- model (ADM UNet, Dhariwal & Nichol 2021) ----------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.num_channels = 32  # base channel count (ADM `num_channels`)
  model.channel_mult = (1, 2, 2)  # channel multiplier per resolution level
  model.num_res_blocks = 1  # residual blocks per level going down (num_res_blocks + 1 going up)
  model.attention_resolutions = (8,)  # feature-map sides (pixels) that get self-attention
  model.num_heads = 1  # attention heads when num_head_channels == -1
  model.num_head_channels = 16  # channels per head; -1 = use num_heads
  model.num_heads_upsample = -1  # heads in the decoder; -1 = num_heads
  model.dropout = 0.0  # dropout rate inside residual blocks
  model.learn_sigma = True  # predict the learned-range variance (ADM hybrid objective)
  model.use_scale_shift_norm = True  # FiLM-like timestep conditioning in residual blocks
  model.resblock_updown = True  # residual blocks for up/downsampling
  model.use_new_attention_order = True  # split qkv before heads (ADM QKVAttention)
  model.conv_resample = True  # learned convolutions when up/downsampling without resblocks
  model.compute_dtype = "float32"  # "float32" | "bfloat16": activation dtype; params stay float32
  model.remat = False  # rematerialise blocks in the backward pass to save memory

  # ---- diffusion ------------------------------------------------------------------------
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.noise_schedule = "cosine"  # "linear" | "cosine" β schedule (IDDPM)
  diffusion.num_timesteps = 1000  # T of the training process
  diffusion.loss_type = "rescaled_mse"  # "mse" | "rescaled_mse" (ADM hybrid: ε-MSE + VLB·T/1000)
  diffusion.timestep_sampler = (
      "loss-second-moment"  # "uniform" | "loss-second-moment" (ADM importance sampler)
  )
  diffusion.sampler_history = 10  # losses kept per timestep by the importance sampler
  diffusion.sampler_uniform_prob = 0.001  # uniform mixing probability of the importance sampler
  diffusion.input_perturbation = 0.0  # ADM-IP γ: x_t built from ε + γ·ξ, target ε; 0 = off

  # ---- adversarial training (PAPER.md §3-§4) ---------------------------------------------
  config.adversarial = adv = ml_collections.ConfigDict()
  adv.mode = "none"  # "none" (plain ADM) | "fast" (the authors' Free-AT loop) | "pgd"
  adv.num_replays = 3  # K of "fast": forward/backward + optimizer + EMA updates per minibatch
  adv.pgd_steps = 1  # k of "pgd": ascent steps on δ with θ fixed, then one update
  adv.step_size = 0.1  # η (authors' adv_lr): ℓ2 step length, or ℓ∞ per-pixel step
  adv.radius = 0.1  # ρ (authors' max_norm): ℓ2 ball radius sqrt(d)·ρ, ℓ∞ radius ρ per pixel
  adv.norm = "l2"  # "l2" (normalised ascent, the paper's) | "linf" (sign ascent, per-pixel clip)
  adv.target = "delta_detach"  # "delta_detach" ε + sg[δ]/σ_t | "delta" ε + δ/σ_t | "original" ε
  adv.init = "zero"  # δ at each minibatch: "zero" (authors) | "random" | "carry" (Free-AT)
  adv.init_magnitude = 0.0  # size of a random initial δ (ℓ2: ‖δ‖ = sqrt(d)·this; ℓ∞: per pixel)
  adv.radius_schedule = (
      "constant"  # "constant" ρ | "ddim_gap": r_t = min(sqrt(2−2·sqrt(ᾱ_t/ᾱ_s)), ρ)
  )
  adv.radius_grid_steps = 50  # DDIM grid whose step gap defines s in the "ddim_gap" radius

  # ---- result tables (--mode=table; PAPER.md §7) ------------------------------------------
  config.table = table = ml_collections.ConfigDict()
  table.runs = ""  # "LABEL=WORKDIR,..." trained runs to tabulate (labels as in the paper)
  table.methods = ("ancestral", "ancestral_es", "ddim", "dpm_solver++")  # diffusion samplers
  table.nfes = (5, 8, 10, 20, 50)  # NFE columns of diffusion runs
  table.cm_nfes = (1, 2)  # NFE columns of consistency-model runs (method "consistency")
  table.num_samples = 50000  # samples per cell (the paper: 50K)
  # "LABEL=PAPER_LABEL,...": show the paper's PAPER_LABEL numbers beside run LABEL (the story's
  # "ADM (clean control)" beside the paper's "ADM"); table.md says so under the table.
  table.published_labels = ""

  # ---- the whole story in one command (adv_diffusion/story.py; configs/digits_at.py) -------
  config.story = story = ml_collections.ConfigDict()
  story.clean_steps = 600  # minibatches of the clean stage the AT and control runs start from
  story.clean_learning_rate = 1e-3  # peak learning rate of the clean stage
  story.clean_warmup_steps = 100  # warm-up of the clean stage
  story.clean_batch_size = 0  # minibatch size of the clean stage; 0 = train.batch_size
  story.clean_workdir = ""  # an existing clean run to start from instead ("" = WORKDIR/clean)
  story.clean_weights = ""  # a weights .npz to start AT and control from; "" = train stage 1
  story.clean_weights_sha256 = ""  # its expected sha256 ("" = unchecked)
  story.methods = ("ddim", "dpm_solver++")  # samplers of the final table
  story.nfes = (5, 10)  # NFE columns of the final table
  story.num_samples = 150  # samples per table cell (Inception: ~0.2 s per image on 2 CPU cores)
  # Extra fine-tunes from the same clean start, tabulated beside AT and the control: () or
  # ("ip",) = ADM-IP (PAPER.md §5), adversarial training off, input perturbation story.ip_gamma,
  # as many optimizer updates as AT.
  story.baselines = ()
  story.ip_gamma = 0.1  # ADM-IP γ of the "ip" baseline (PAPER.md §5: 0.15 CIFAR-10, 0.1 elsewhere)
  # At start-up, time each remaining training stage's step and one sampling network call and
  # Inception batch on the devices (on separate states: the run is unchanged) and print the
  # expected accelerator-hours (the paper_* configs turn it on; it compiles each stage's program
  # and times Inception batches, a minute or more on CPU).
  story.estimate = False
  story.estimate_steps = 3  # timed steps per training program (after one compiling step)

  # ---- the story over seeds, with robustness (--mode=study; configs/digits_study.py) ------
  config.study = study = ml_collections.ConfigDict()
  study.seeds = (0, 1, 2)  # config.seed and sampling.seed of each repetition of the story
  study.robustness = True  # also compare AT and control under --mode=robustness's attacks

  # ---- robustness under attack (--mode=robustness): FID against perturbation budget --------
  config.robustness = rob = ml_collections.ConfigDict()
  rob.runs = ""  # "LABEL=WORKDIR,..." runs to attack; "" = table.runs
  rob.nfe = 10  # DDIM steps (η = sampling.eta) of the attacked trajectories
  rob.kinds = ("random", "adversarial")  # Gaussian direction | PGD on the denoising error
  rob.budgets = (0.02, 0.05, 0.1)  # ρ: ‖δ‖₂ ≤ ρ·sqrt(d) per example (per-pixel RMS; 0 = clean)
  rob.attack_steps = (0, 3, 6)  # sampler step indices (0 = first, at t ≈ T) where x_t is perturbed
  rob.pgd_steps = 5  # ascent steps of the adversarial perturbation (each a forward + backward)
  rob.num_samples = 10000  # samples per cell

  # ---- consistency models (PAPER.md §8; "none" = train the diffusion model itself) --------
  config.consistency = cm = ml_collections.ConfigDict()
  cm.mode = "none"  # "none" | "distill" (CD from a teacher run) | "train" (CT, no teacher)
  cm.teacher = ""  # CD: workdir of the trained diffusion model (same config.model)
  cm.teacher_step = -1  # CD: checkpoint step of the teacher; -1 = its latest
  cm.teacher_use_ema = True  # CD: distil the teacher's EMA weights (True) or raw params
  cm.teacher_ema_index = 0  # CD: which EMA average of the teacher run
  cm.teacher_command = ""  # CD: how to train the teacher run (shown when it is missing)
  cm.num_scales = 50  # N: grid t_n = round(n·(T−1)/N), n = 0..N (t_0 = 0 where f(x, t_0) = x)
  cm.skip = 1  # k: the teacher's DDIM step goes from t_{n+k} to t_n
  cm.distance = "l2"  # "l2" (mean squared) | "pseudo_huber" | "lpips" (LPIPS-VGG v0.1, frozen)
  # "lpips": the converted VGG16 + LPIPS weights (evaluation/convert_lpips.py); "" = the default
  # file $ADV_DIFFUSION_LPIPS or ~/.cache/adv_diffusion/lpips_vgg.npz. Never downloaded.
  cm.lpips_weights = ""
  # "lpips": bilinear resize of both images to this many pixels before VGG (Song et al. 2023
  # upsample to 224); 0 = as they are (VGG16 needs ≥ 16 pixels).
  cm.lpips_resize = 224
  cm.sigma_data = 0.5  # σ_d of the boundary scalings c_skip, c_out
  cm.timestep_scale = 10.0  # s in c_skip(t) = σ_d²/((s·t)² + σ_d²) (LCM's timestep scaling)
  cm.clip_x0 = True  # clip the x_0 prediction inside f to [-1, 1] (ADM's clip_denoised)
  cm.target_ema = 0.95  # μ of the target network θ⁻ ← μ·θ⁻ + (1−μ)·θ (final value)
  cm.target_ema_schedule = "constant"  # "constant" μ | "linear" ramp from target_ema_start
  cm.target_ema_start = 0.9  # "linear": μ at the first update
  cm.target_ema_ramp_updates = 0  # "linear": optimizer updates of the ramp

  # ---- optimiser (AdamW as ADM) -----------------------------------------------------------
  config.torch_io = tio = ml_collections.ConfigDict()
  tio.checkpoint = ""  # import_torch: guided-diffusion model file, e.g. model250000.pt
  tio.ema = (
      ""  # import_torch: comma-separated EMA files, one per train.ema_rates ("" = the model's)
  )
  tio.step = (
      -1
  )  # import_torch: step to write (-1 = the number in the model file name, else 0); export_torch: step to export (-1 = latest)
  tio.out = ""  # export_torch: output directory ("" = WORKDIR/torch)

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4  # peak learning rate
  optim.weight_decay = 0.0  # decoupled weight decay
  optim.b1 = 0.9  # Adam β1
  optim.b2 = 0.999  # Adam β2
  optim.eps = 1e-8  # Adam ε
  optim.warmup_steps = 0  # linear learning-rate warmup over this many optimizer updates; 0 = none
  optim.grad_clip_norm = 0.0  # clip gradients to this global ℓ2 norm; 0 = no clipping

  # ---- training loop ----------------------------------------------------------------------
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # GLOBAL batch size, split over all devices of all processes
  train.num_steps = 2000  # minibatch iterations of this run
  train.ema_rates = (0.9999,)  # EMA decay rates of the parameter averages kept in the state
  train.log_every = 50  # write scalar metrics every this many steps
  train.checkpoint_every = 500  # save a checkpoint every this many steps (and at the end)
  train.keep_checkpoints = 3  # most recent checkpoints kept
  train.keep_every = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
  train.async_checkpointing = True  # write checkpoints in the background
  train.sample_every = 1000  # write a PNG sample grid every this many steps; 0 = never
  train.sample_grid_size = 64  # images in the periodic sample grid
  train.sample_respacing = "50"  # ADM respacing of the grid's ancestral sampler
  # workdir of another run, or a weights .npz (--mode=export_weights): start from its params and
  # EMA (a weights file: both from its one tree), fresh optimizer
  train.init_from = ""
  train.init_from_sha256 = ""  # expected sha256 of an `init_from` weights file; "" = unchecked
  train.init_from_step = -1  # checkpoint step of `init_from`; -1 = its latest
  train.init_from_command = ""  # how to train the `init_from` run (shown when it is missing)
  # A non-finite loss or parameter after an update: "skip" drops the update (the state stays
  # as before the step; counted in `skipped_updates`), "stop" ends the run with one sentence.
  train.on_nonfinite = "skip"
  train.max_consecutive_skips = 10  # "skip": stop after this many skipped steps in a row; 0 = never
  train.preemption_grace_seconds = 25.0  # after SIGTERM, save within this many seconds or exit 1

  # ---- sample generation (--mode=sample) ----------------------------------------------------
  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.method = "ddim"  # "ancestral" | "ancestral_es" | "ddim" | "dpm_solver" | "dpm_solver++"
  #                           | "consistency" (one-/multistep, for consistency models)
  sampling.cm_timesteps = ()  # consistency: decreasing timesteps, one per NFE; () = evenly spaced
  sampling.nfe = 50  # model calls per sample (respaced steps, or DPM-Solver calls)
  sampling.num_samples = 50000  # size of the sample set written to workdir/samples/<tag>.npz
  sampling.batch_size = 256  # GLOBAL batch (one chunk file), split over all devices
  sampling.use_ema = True  # sample with EMA params (True) or the raw params (False)
  sampling.ema_index = 0  # which rate of train.ema_rates when use_ema
  sampling.checkpoint_step = -1  # checkpoint step of this workdir to sample from; -1 = latest
  sampling.seed = 0  # sampling PRNG seed (not the train seed); sample i uses fold_in(seed, i)
  sampling.clip_denoised = True  # clip predicted x_0 to [-1, 1] (ancestral, ancestral_es, ddim,
  # dpm_solver++); unclipped, x_0 = (x_t − σ_t·ε)/α_t blows ε errors up by 1/α_t near t = T
  sampling.eps_scale = 1.017  # ADM-ES ε divisor (ancestral_es only; 1.017 = paper, CIFAR-10)
  sampling.eta = 0.0  # DDIM η (ddim only): 0 = deterministic ODE, 1 = DDPM-like noise
  sampling.dpm_t_start = 1.0  # DPM-Solver(++) start time in (0, 1] (the authors' script: 0.992)
  sampling.dpm_truncate_cosine_like_reference = (
      False  # the reference code's 996-knot cosine grid and N = 996 time map
  )
  sampling.preset = ""  # "" | "authors": dpm_solver++ as the authors ran it (t_start 0.992, 996-knot map, no x_0 clipping)

  # ---- evaluation (--mode=fid_stats, --mode=eval) -----------------------------------------
  config.evaluation = evaluation = ml_collections.ConfigDict()
  evaluation.reference = (
      ""  # reference statistics/image npz; "" = workdir/eval/reference_<data>.npz
  )
  evaluation.samples = ""  # sample npz to score; "" = the newest set named by config.sampling
  evaluation.inception_weights = (
      ""  # converted FID Inception npz; "" = $ADV_DIFFUSION_INCEPTION or cache
  )
  evaluation.resize_rule = "tf1_bilinear"  # "tf1_bilinear" (ADM/TF, paper) | "pytorch_bilinear"
  evaluation.batch_size = 200  # images per Inception batch (split over devices)
  evaluation.max_reference_images = 0  # use only the first N images of the split; 0 = all
  evaluation.precision_recall = True  # k-NN precision/recall (needs an image reference)
  evaluation.fid_method = "sqrtm"  # "sqrtm" (pytorch-fid numerics) | "eigh" (same value, faster)
  # fid_stats: keep the reference's pool features in its statistics file (8 KB per image), so
  # that KID and precision/recall can be computed against it.
  evaluation.reference_features = True
  # fid_stats: take the reference's pool features from this file (written by an earlier fid_stats
  # with export_reference_features) when it describes the same images, Inception weights and
  # resize rule, instead of running Inception over the images; its sha256 is checked when given.
  evaluation.reference_features_file = ""
  evaluation.reference_features_sha256 = ""
  evaluation.export_reference_features = ""  # fid_stats: also write such a file to this path
  # eval: also write the samples' pool features to WORKDIR/eval/<samples>_pool.npz (8 KB per
  # image; the main job's paired AT − control comparison reads them).
  evaluation.save_sample_features = False

  return config
