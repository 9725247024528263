"""The records' tables, declared: one pyarrow schema per table, each column with its type and meaning.

Every writer (ok, diverged and failed runs alike, every rank, every executor, diagnose, profile) writes exactly
its table's schema (``conform``: a missing column becomes typed nulls, a column the schema does not declare is
an error), so any parquet reader opens a results folder as it is: ``pandas.read_parquet("DIR/runs")``,
``pyarrow.dataset``, DuckDB's ``read_parquet('DIR/runs/*.parquet')``, polars. Files written before the schema
was declared (version 1: a column added mid-sweep, an ``error`` column typed null in one file and string in
the next, ``lr_grid`` as text) are read into the current schema by ``upgrade``, so the readers need no guards.
The README's "Reading the records" section is generated from the docs here (tests/bench/test_records.py checks it).

Reads no torch: the reader side (report, status, tuning, verdicts) imports this module.
"""
from __future__ import annotations

import pyarrow as pa

VERSION = 2  # 1: the files of earlier versions, written by pandas with whatever types a row happened to have
S, I, F, B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
LIST_F, LIST_I = pa.list_(pa.float64()), pa.list_(pa.int64())

# the hardware and software of the process that wrote a row (bench.env.environment): runs and profile rows
ENVIRONMENT = [
    ("device", S, "the device trained or profiled on: cpu, cuda, cuda:N"),
    ("gpu_name", S, "the GPU's name (CUDA only)"),
    ("cpu", S, "the CPU's model name (never a hostname)"),
    ("cpu_isa", S, "the CPU's instruction sets that change its numbers or speed (avx512_bf16, amx_bf16, ...)"),
    ("cpu_capability", S, "the kernels torch dispatches to on this CPU (e.g. AVX512)"),
    ("cpu_threads", I, "torch's intra-op threads in the process"),
    ("torch_version", S, "torch.__version__"),
    ("cuda_version", S, "the CUDA torch was built with"),
    ("cudnn_version", I, "cuDNN's version (CUDA only)"),
    ("cuda_visible_devices", S, "CUDA_VISIBLE_DEVICES of a worker pinned to a GPU"),
    ("python_version", S, "Python's version"),
    ("resbench_version", S, "resbench's version"),
    ("git_sha", S, "the commit resbench ran from"),
    ("git_dirty", B, "whether its working tree had uncommitted changes"),
    ("utc_time", S, "when the row was written (ISO 8601, UTC)"),
]

RUNS = [
    ("run_id", S, "the run's identity: model-dataset-recipe-s<seed>-<hash of its spec>; a rerun finds its runs by it"),
    ("schema_version", I, "the version of this schema the row was written (or upgraded) to"),
    ("sweep", S, "the sweep's name (not part of the identity)"),
    ("model", S, "the network's name, e.g. plain56, resnet18, fixup20"),
    ("family", S, "cifar (6n+2 layers, He et al. sec. 4.2) or imagenet (ResNet-18..152)"),
    ("kind", S, "the network kind: resnet, plain, preresnet, preplain, or a method (highway, fixup, ...) or plugin"),
    ("method", S, "the same as kind (kept for readers of earlier versions)"),
    ("net_label", S, "what the report calls the net: plain or residual for He et al.'s kinds, else the kind"),
    ("baseline", B, "one of He et al.'s own kinds (plain/residual, pre-activation or not)"),
    ("pre_activation", B, "pre-activation blocks (He et al. 2016): no response after BN before the addition"),
    ("has_bn", B, "the net has BatchNorm layers"),
    ("groupable", B, "runs of this kind can train fused in a run group"),
    ("normalization", S, "bn or none"),
    ("method_params", S, "a method's hyper-parameters, JSON text (part of the run_id)"),
    ("lr_scales", S, "parameter groups trained at another lr, JSON [[regex, factor], ...]"),
    ("method_derived", S, "what a method derived at build time, JSON text (TAT's slope)"),
    ("plugin", S, "a plugin kind's package==version"),
    ("depth", I, "layers"),
    ("residual", B, "a shortcut (or carry) path beside each block"),
    ("shortcut", S, "He et al.'s shortcut option where the shape changes: A (zero-padding), B or C (projections)"),
    ("width", F, "channel multiplier (1.0: 16/32/64 filters in the CIFAR family)"),
    ("dataset", S, "cifar10, cifar100, fashion-mnist, synthetic, imagenet, imagenette"),
    ("seed", I, "the seed: initialisation, data order and augmentation"),
    ("bn_batch", I, "images BatchNorm normalises over where fewer than the batch (a data-parallel run's share)"),
    ("method_recipe", S, "matched (the shared recipe) or paper (the method's own paper's settings)"),
    ("lr_tuning", S, "'' (lr given), grid (one lr of a tuned sweep's grid) or chosen (the grid's choice)"),
    ("lr_grid", LIST_F, "a tuned run's grid of lrs (the sweep's, or its kind's own)"),
    ("lr_grid_seeds", LIST_I, "a tuned run's grid seeds (its sweep's results are the other seeds)"),
    ("lr_grid_widen", I, "a tuned run's bound: factor-2 steps its cell's grid may grow at each end"),
    ("lr_chosen_by", S, "the rule a chosen run's lr was chosen by"),
    ("recipe", S, "the recipe's name: he2015, quick, smoke, fixup2019, he2015-imagenet, imagenette"),
    ("batch_size", I, "training batch (global, over every process of a data-parallel run)"),
    ("lr", F, "base learning rate"),
    ("momentum", F, "SGD momentum"),
    ("weight_decay", F, "L2 weight decay"),
    ("iterations", I, "optimizer steps (epochs where schedule_in is epochs)"),
    ("milestones", S, "comma-separated steps (or epochs) at which the lr is multiplied by lr_decay"),
    ("lr_decay", F, "the factor at each milestone"),
    ("schedule", S, "step (milestones) or cosine (to 0 at the last step)"),
    ("warmup_lr", F, "the warm-up's lr"),
    ("warmup_iters", I, "warm-up steps"),
    ("warmup_min_depth", I, "nets at least this deep warm up"),
    ("val_size", I, "validation images held out of the training set"),
    ("train_size", I, "training images used (null: all)"),
    ("test_size", I, "test images evaluated (null: all)"),
    ("eval_every", I, "steps (or epochs) between evaluation points"),
    ("ten_crop", B, "the final test error also by the 10-crop test (ImageNet-style data)"),
    ("lighting", B, "Krizhevsky et al.'s PCA lighting augmentation (ImageNet-style data)"),
    ("normalize", S, "input: pixel-mean, standardize or pln"),
    ("mixup", F, "mixup's Beta(a, a) parameter (0: off); training error is then on mixed batches"),
    ("decay_1d", B, "weight decay also on 1-D parameters"),
    ("schedule_in", S, "steps or epochs: what iterations, milestones and eval_every count"),
    ("params", I, "parameters"),
    ("macs", I, "multiply-adds per image (forward)"),
    ("status", S, "ok, diverged (non-finite loss) or failed (raised; retried by the next sweep)"),
    ("error", S, "a failed or diverged run's error"),
    ("iterations_done", I, "the last evaluation point's step"),
    ("resumed_from", I, "the step the last attempt continued from (0: uninterrupted)"),
    ("final_train_loss", F, "training loss at the last evaluation point"),
    ("final_train_err", F, "training error (fraction) at the last evaluation point: the running error over the "
                           "augmented batches since the point before"),
    ("final_val_err", F, "validation error at the last evaluation point"),
    ("late_val_err", F, "mean validation error over the evaluation points of the last quarter of the steps "
                        "(what a tuned sweep chooses on)"),
    ("final_test_err", F, "test error at the last evaluation point"),
    ("final_test_err_10crop", F, "the 10-crop test error at the end (ImageNet-style data with ten_crop)"),
    ("best_train_err", F, "lowest training error over the evaluation points"),
    ("best_val_err", F, "lowest validation error over the evaluation points"),
    ("test_err_at_best_val", F, "test error at the point of lowest validation error (selection never sees the test)"),
    ("best_test_err", F, "lowest test error over the evaluation points (optimistic: selected on the test set)"),
    ("train_img_per_s", F, "this run's training images per second: median over timed windows"),
    ("group_img_per_s", F, "every member's images per second while a run group trained"),
    ("step_time_ms", F, "median milliseconds per training step"),
    ("timed_windows", I, "windows between evaluation points timed (the last attempt's, less its first)"),
    ("train_time_s", F, "seconds of training steps"),
    ("wall_time_s", F, "seconds of the run, start to record"),
    ("peak_memory_bytes", I, "peak memory: CUDA's allocator, or the CPU process's resident set"),
    ("amp", B, "bf16 autocast"),
    ("channels_last", B, "NHWC memory format"),
    ("execution", S, "eager, compile or cudagraph"),
    ("cudnn_benchmark", B, "cuDNN autotuning"),
    ("pad_input", I, "input channels a group member was zero-padded to (0: none)"),
    ("world_size", I, "processes of a data-parallel run"),
    ("per_process_batch", I, "each process's share of the batch"),
    ("bn_mode", S, "whole batch, per process or synchronised"),
    ("train_path", S, "the loader and execution that trained it"),
    ("group_size", I, "runs trained together as one grouped network"),
    ("group_id", S, "the run group's id"),
    ("decode_on", S, "ImageNet-style data: where the JPEGs were decoded (workers or device)"),
    ("data_source", S, "the data copy's path"),
    ("data_sha256", S, "sha256 of the data copy's bytes (a tree: of its names and sizes)"),
    ("data_official", B, "whether its files match their publishers' md5"),
] + ENVIRONMENT

CURVES = [
    ("run_id", S, "the run"),
    ("iteration", I, "optimizer steps done"),
    ("epoch", F, "epochs done (steps / steps per epoch)"),
    ("lr", F, "the lr the optimizer used for the last step before the point"),
    ("train_loss", F, "mean training loss since the point before"),
    ("train_err", F, "training error over the augmented batches since the point before"),
    ("val_err", F, "validation error"),
    ("test_err", F, "test error"),
    ("train_time_s", F, "seconds of training steps so far"),
    ("img_per_s", F, "training images per second since the point before"),
    ("data_wait_s", F, "seconds the steps waited for their batches since the point before (reading, decoding, "
                       "augmenting: a run whose input bounds it waits most of its window)"),
]
LAYERS = [
    ("run_id", S, "the run"), ("iteration", I, "optimizer steps done"), ("layer", I, "weighted layer, input first"),
    ("layer_name", S, "the parameter's name"), ("weight_norm", F, "||W||"),
    ("grad_norm", F, "||g|| of the last step's gradient"), ("update_ratio", F, "lr ||g|| / ||W||"),
    ("grad_rms", F, "||g|| / sqrt(parameters)"), ("grad_x_weight", F, "||g|| ||W|| (unchanged by a scale before BN)"),
]
SIGNALS = [
    ("run_id", S, "the run"), ("iteration", I, "optimizer steps done"), ("block", I, "block, input first"),
    ("block_name", S, "the block's module name"),
    ("signal_rms", F, "RMS of the gradient of one image's loss at the block's output"),
    ("batches", I, "training batches averaged"),
]
_ANALYSIS_ID = [("run_id", S, "the run"), ("model", S, "the network's name"), ("kind", S, "the network kind"),
                ("depth", I, "layers"), ("seed", I, "the run's seed")]
RESPONSES = _ANALYSIS_ID + [("layer", I, "BN layer, input first"), ("layer_name", S, "its module name"),
                            ("std", F, "std of its response (after BN, before the addition and ReLU)")]
_LESION_ID = _ANALYSIS_ID[:3] + [("method", S, "the network kind")] + _ANALYSIS_ID[3:]  # as diagnose writes them
LESION = _LESION_ID + [
    ("residual", B, "a shortcut path beside each block"),
    ("images", I, "test images evaluated"), ("amp", B, "bf16 autocast"),
    ("mode", S, "intact, one (one block deleted) or k (k random blocks deleted)"),
    ("position", S, "the deleted block's place (one), or the kind of blocks drawn"), ("k", I, "blocks deleted"),
    ("draw", I, "the random set's number"), ("blocks", S, "the deleted blocks"), ("error", F, "test error"),
]
SHATTERED = _LESION_ID + [
    ("residual", B, "a shortcut path beside each block"),
    ("state", S, "initial or trained"), ("bn_statistics", S, "where the initial net's BN statistics came from"),
    ("image", I, "test image"), ("k", I, "step along the line"), ("distance", F, "distance per pixel"),
    ("correlation", F, "cosine of the input gradients at the image and at the distance"),
]
PROFILE = [
    ("model", S, "the network's name"), ("family", S, "cifar or imagenet"), ("kind", S, "the network kind"),
    ("depth", I, "layers"), ("residual", B, "a shortcut path beside each block"), ("batch_size", I, "batch"),
    ("precision", S, "fp32 or bf16"), ("memory_format", S, "nchw or channels_last"),
    ("execution", S, "eager, compile or cudagraph"),
    ("mode", S, "train, infer, train-pipeline (the common pipeline or ours) or decode"),
    ("group_size", I, "runs in a run group"), ("pad_input", I, "input channels padded to"),
    ("status", S, "ok, oom or failed"), ("error", S, "what went wrong"), ("params", I, "parameters"),
    ("macs", I, "multiply-adds per image"), ("img_per_s", F, "images per second: median over timed blocks"),
    ("img_per_s_min", F, "the slowest block"), ("img_per_s_max", F, "the fastest block"),
    ("step_ms", F, "milliseconds per step"), ("steps_per_block", I, "steps per timed block"),
    ("repeats", I, "timed blocks"), ("warmup_steps", I, "untimed steps first"), ("warmup_s", F, "their seconds"),
    ("peak_memory_bytes", I, "peak memory"), ("mfu", F, "model FLOP utilisation against the dense peak"),
    ("pipeline", S, "train-pipeline rows: common or ours"), ("pipeline_desc", S, "what the pipeline is"),
    ("speedup", F, "ours over the common pipeline"), ("data", S, "the data the profile used"),
    ("workers", I, "decode rows: worker processes"), ("decode_on", S, "decode rows: workers or device"),
    ("decode_device", S, "decode rows: the device that decoded"),
    ("img_per_s_per_core", F, "decode rows: images per second per core"), ("images", I, "decode rows: images"),
    ("seconds", F, "decode rows: seconds timed"), ("train_images", I, "decode rows: the tree's training images"),
    ("sampled_images", I, "decode rows: the training images timed from"),
    ("mean_file_kb", F, "decode rows: mean size of the files timed, KiB"),
    ("mean_megapixels", F, "decode rows: mean megapixels of the images timed"),
    ("image_size", I, "the input's side, pixels (32; 224 for the ImageNet-style family)"),
    ("stem", S, "the ImageNet-style family's stem: cifar (3x3) or imagenet (7x7 + max-pool)"),
] + ENVIRONMENT

TABLES = {"runs": RUNS, "curves": CURVES, "layers": LAYERS, "signals": SIGNALS, "responses": RESPONSES,
          "lesion": LESION, "shattered": SHATTERED, "profile": PROFILE}
# the tables a results folder keeps one file per run of (and `resbench pack` packs into one file each)
PER_RUN = ("runs", "curves", "layers", "signals")


def schema(table: str) -> pa.Schema:
    """``table``'s declared schema (every column nullable: a failed run's row has no errors to report)."""
    return pa.schema([pa.field(name, typ, nullable=True, metadata={"doc": doc}) for name, typ, doc in TABLES[table]],
                     metadata={"resbench.table": table, "resbench.schema_version": str(VERSION)})


def docs(table: str) -> list[tuple[str, str, str]]:
    """(column, type, meaning) of ``table``, in order."""
    return [(name, str(typ), doc) for name, typ, doc in TABLES[table]]


class SchemaError(ValueError):
    """A frame that does not fit its table's declared schema."""


def _column(values: list, typ: pa.DataType, name: str, table: str) -> pa.Array:
    try:
        return pa.array(values, type=typ, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
        raise SchemaError(f"{table}.{name}: values do not fit the declared type {typ} ({e}); declare the column's "
                          f"type in bench/schema.py") from e


def conform(df, table: str) -> pa.Table:
    """``df`` (a pandas frame) as exactly ``table``'s schema: declared columns in order, missing ones null,
    each value cast to its declared type. A column the schema does not declare is a SchemaError: a writer
    may not add a column without declaring it."""
    extra = [c for c in df.columns if c not in {name for name, _, _ in TABLES[table]}]
    if extra:
        raise SchemaError(f"{table}: column(s) {', '.join(map(str, extra))} not declared in bench/schema.py "
                          f"(declare each with its type and meaning)")
    sch = schema(table)
    if table == "runs" and "schema_version" not in df.columns:
        df = df.assign(schema_version=VERSION)
    n = len(df)
    arrays = [_column(_values(df[f.name]) if f.name in df.columns else [None] * n, f.type, f.name, table)
              for f in sch]
    return pa.Table.from_arrays(arrays, schema=sch)


def _values(series) -> list:
    """A pandas column as Python values: NaN in an object column is a null, numpy scalars plain ones."""
    out = []
    for v in series.tolist():
        if isinstance(v, float) and v != v and series.dtype == object:
            v = None
        out.append(v)
    return out


def upgrade(table: pa.Table, name: str) -> pa.Table:
    """A file of any version read into ``name``'s current schema: columns it lacks become nulls (or, for the
    traits of a net, what its other columns say), null-typed and differently typed columns are cast, text
    lists (``lr_grid`` "0.1,0.2") become lists; columns no longer declared are dropped."""
    sch = schema(name)
    cols = {}
    n = table.num_rows
    for f in sch:
        if f.name in table.column_names:
            col = table.column(f.name)
            cols[f.name] = col if col.type == f.type else _cast(col, f.type, f.name, name)
        else:
            cols[f.name] = pa.nulls(n, f.type)
    if name == "runs" and "schema_version" not in table.column_names:  # written before the schema: version 1
        cols = _runs_v1(cols, n)
    if name == "profile":
        cols = _profile_v1(cols)
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


def _profile_v1(cols: dict) -> dict:
    """Profile rows of earlier versions timed single nets, unpadded, on 32 x 32 images: those columns' nulls on
    a timed row (train, infer, train-pipeline; not decode) are those values."""
    timed = [m is not None and m != "decode" for m in cols["mode"].to_pylist()]
    for name, value in (("group_size", 1), ("pad_input", 0), ("image_size", 32)):
        vals = cols[name].to_pylist()
        cols[name] = pa.array([value if v is None and t else v for v, t in zip(vals, timed)], type=I)
    return cols


def _cast(col: pa.ChunkedArray, typ: pa.DataType, column: str, table: str) -> pa.ChunkedArray:
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), typ)
    if pa.types.is_list(typ) and (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):  # "0.1,0.2"
        cast = float if pa.types.is_floating(typ.value_type) else int
        return pa.array([None if v is None else [cast(x) for x in v.split(",") if x] for v in col.to_pylist()], type=typ)
    try:
        return col.cast(typ)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SchemaError(f"{table}.{column}: a {col.type} column cannot be read as {typ} ({e})") from e


# He et al.'s own kinds and their traits, for rows written before the rows recorded them (version 1): the
# families of resnet.baselines, as they were then. Newer rows carry the family's own traits.
_V1_BASELINES = {"resnet": False, "plain": False, "preresnet": True, "preplain": True}  # kind -> pre-activation


def _runs_v1(cols: dict, n: int) -> dict:
    """Rows of version 1 lack the net's traits: derived from their kind, residual and normalization columns."""
    kind, residual = cols["kind"].to_pylist(), cols["residual"].to_pylist()
    norm = cols["normalization"].to_pylist()
    base = [k in _V1_BASELINES for k in kind]
    cols["baseline"] = pa.array(base, type=B)
    cols["net_label"] = pa.array([("residual" if r else "plain") if b else k for k, r, b in zip(kind, residual, base)],
                                 type=S)
    cols["pre_activation"] = pa.array([_V1_BASELINES.get(k, False) for k in kind], type=B)
    cols["has_bn"] = pa.array([x != "none" for x in norm], type=B)
    cols["groupable"] = pa.array([k in ("resnet", "plain") for k in kind], type=B)
    cols["schema_version"] = pa.array([1] * n, type=I)
    return cols


def lists_as_tuples(df):
    """A frame from ``to_pandas`` with its list cells as tuples: hashable, so pandas can group and compare them."""
    for name, typ, _ in RUNS:
        if pa.types.is_list(typ) and name in df.columns:
            df[name] = [tuple(v) if v is not None and not isinstance(v, float) else () for v in df[name]]
    return df



def markdown(table: str) -> str:
    """``table``'s columns as a markdown table (the README's "Reading the records" section shows it)."""
    lines = ["| column | type | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {typ} | {doc} |" for name, typ, doc in docs(table)]
    return "\n".join(lines)
