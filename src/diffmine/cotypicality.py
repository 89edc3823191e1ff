"""Co-typical elements (paper section 5.1): what every label does to the same place of a scene.

Each translated image gives a tuple (x^{c0 -> c} for every label c; x itself for its own label
c0). Each member is scored under its own label, and a patch's co-typicality is the median over
the tuple of the member's patch typicality:

    T_bar(x, box) = median_c  mean_{box} T(x^{c0 -> c} | c)

so a patch ranks high only where every label makes the scene typical of itself. Per tuple the
``per_tuple`` best non-overlapping boxes are kept, then the ``top`` best overall; each is a
sequence of |C| crops. A sequence is described by its members' DIFT features (each member under
its own label, pooled over the box), each label's block reduced by its own UMAP to ``umap_dim``
dimensions and concatenated, as the authors did; the sequences are clustered with k-means, the
clusters ranked by median co-typicality and their members by distance to the centroid.

    RUN/cotypicality/shard-00000.safetensors   per tuple: (|C|, h, w) latent typicality maps
    RUN/cotypicality/shard-00000.parquet       per tuple: image_id, source_label, key, status
    RUN/cotypicality/sequences.parquet         image_id, source_label, x0, y0, x1, y1,
                                               cotypicality, typicality_<label>..., cluster,
                                               cluster_rank, rank_in_cluster
    RUN/cotypicality/features.npy              the reduced, concatenated features per sequence

Shard s holds the scenes s * shard_size onwards (:func:`tuples` order: the scenes translated to
every label), a scene's key its place in the shard. A scene whose source cannot be read, or
changed since listing, is left out: a bad row when it is scored, or its sequences dropped when its
members are described (an edit after its maps were stored). Such a problem may be fixed while the
listing stays (``data.problem_may_be_fixed``): the result records those scenes as left out, so the
next ``diffmine cotypicality`` retries them as translate retries its images
(``shards.retry_in_shard``): each scene with a bad row that is now readable as listed is scored
under the key it would have had and its shard rewritten with its row in place of the bad one, every
other row and map kept as stored (a scene still unreadable rewrites nothing); then the sequences,
features and clusters are made again from every shard (cheap beside the scoring). The result then
equals what a run on the fixed files makes (the test checks it bit for bit on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm import tqdm

from .clustering import kmeans, rank_clusters
from .atomic import write_table, write_with
from .data import BadImage, Problem, listed_by_id, load_image, to_model_input
from .features import FeatureConfig, dift_feature_maps, pool_boxes
from .mining import default_patch_size, greedy_boxes, patch_scores
from .models import Backend
from .shards import (images_to_retry, missing_shards, positional_shards, read_array, read_index, retry_in_shard,
                     write_shard)
from .terminal import shell_word
from .typicality import TypicalityConfig, typicality_latent_maps, upsample


@dataclass
class CotypicalityConfig:
    top: int = 10_000  # sequences kept overall
    per_tuple: int = 5  # non-overlapping boxes kept per translated scene
    patch: int | None = None  # side in pixels; None: the mining step's
    umap_dim: int = 32
    k: int = 32
    samples: int = 16  # (t, eps) draws per member; t range and estimator follow the run's typicality
    shard_size: int = 64  # tuples per stored shard
    seed: int = 0

    def __post_init__(self):
        if min(self.top, self.per_tuple, self.umap_dim, self.k, self.samples, self.shard_size) < 1 or (
                self.patch is not None and self.patch < 1):
            raise ValueError("top, per_tuple, umap_dim, k, samples and shard_size must be >= 1, patch >= 1 or None")


SHARD_SCHEMA = pa.schema([
    ("index", pa.int64()), ("image_id", pa.string()), ("source_label", pa.string()), ("labels", pa.string()),
    ("height", pa.int32()), ("width", pa.int32()), ("key", pa.string()), ("status", pa.string()),
    ("problem", pa.string()),
])


# ----------------------------------------------------------------------------------------------
# pure functions


def cotypical_boxes(pixel_maps: np.ndarray, k: int, n: int) -> list[tuple[int, int, float, np.ndarray]]:
    """The ``n`` best non-overlapping boxes of a tuple by median patch typicality.

    Args:
        pixel_maps: (M, H, W) each member's typicality under its own label
    Returns:
        [(y0, x0, co-typicality, (M,) per-member patch typicality), ...]
    """
    per_member = np.stack([patch_scores(m, k) for m in pixel_maps])  # (M, H-k+1, W-k+1)
    median = np.median(per_member, axis=0)
    return [(y, x, score, per_member[:, y, x]) for y, x, score in greedy_boxes(median, k, n)]


def reduce_blocks(blocks: list[np.ndarray], dim: int, seed: int) -> np.ndarray:
    """Each (N, D_c) block reduced by its own UMAP to ``dim`` columns, concatenated: (N, M * dim').

    With few points UMAP's dimension is capped at N - 2 (its spectral layout needs it).
    """
    import umap

    reduced = []
    for block in blocks:
        n = len(block)
        components = max(1, min(dim, n - 2))
        reducer = umap.UMAP(n_components=components, n_neighbors=max(2, min(15, n - 1)), random_state=seed,
                            init="spectral" if n > components + 1 else "random", n_jobs=1)
        reduced.append(reducer.fit_transform(block.astype(np.float32)))
    return np.concatenate(reduced, axis=1)


# ----------------------------------------------------------------------------------------------
# the step


def tuples(run) -> tuple[pd.DataFrame, list[str]]:
    """Translated scenes with every label the run translated to: (rows: image_id, path, label), labels."""
    index = run.translations_index()
    ok = index[index["status"] == "ok"]
    labels = sorted(set(ok["target_label"]) | set(ok["source_label"]))
    wanted = {label: len([c for c in labels if c != label]) for label in labels}
    counts = ok.groupby(["image_id", "source_label"])["target_label"].nunique().reset_index()
    complete = counts[counts["target_label"] == counts["source_label"].map(wanted)]
    images = run.images().set_index("image_id").loc[complete["image_id"]].reset_index()
    return images, labels


def tuple_pixels(run, image_id: str, source_path: str, source_label: str, labels: list[str], resolution: int,
                 resize: str, multiple: int, listed: tuple[int, int, str] | None = None) -> np.ndarray:
    """(M, H, W, 3) uint8: the source for its own label, its translations for the others.
    ``listed``: the source's (size, mtime_ns, fingerprint) in the listing: a source edited since
    is refused (BadImage), never set beside translations made from the listed bytes."""
    members = []
    for label in labels:
        if label == source_label:
            image = load_image(source_path, resolution, resize, multiple, listed)
        else:
            image = run.translation(image_id, label)
        members.append(image)
    return np.stack(members)


def missing_cotypicality(run, config: CotypicalityConfig) -> list[tuple[str, slice]]:
    """The shards of RUN/cotypicality still to compute, or [("sequences", ...)] when only the
    sequences table is missing."""
    directory = run.path / "cotypicality"
    todo = missing_shards(directory, len(tuples(run)[0]), config.shard_size)
    if not todo and not (directory / "sequences.parquet").is_file():
        return [("sequences", slice(0, 0))]
    return todo


def score_scenes(run, backend: Backend, scenes: pd.DataFrame, labels: list[str], draws: TypicalityConfig, dataset: dict,
                 progress=None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Each scene's members scored under their own labels: a shard's (arrays, rows).

    ``scenes``: rows of :func:`tuples`, indexed by their place in the shard, which keys their maps:
    a scene scored on its own (a retry) gets the key it gets with the others. A scene whose source
    cannot be read as listed gets a bad row, no maps."""
    prompts = [run.prompt(label) for label in labels]
    null = run.prompt(None)
    arrays, rows = {}, []
    for place, r in zip(scenes.index, scenes.itertuples()):
        row = dict(index=int(r.index), image_id=r.image_id, source_label=r.label, labels=",".join(labels),
                   height=0, width=0, key=str(place), status="ok", problem=None)
        try:
            members = tuple_pixels(run, r.image_id, r.path, r.label, labels, dataset["resolution"],
                                   dataset["resize"], backend.latent_factor, (r.size, r.mtime_ns, r.fingerprint))
        except BadImage as exc:  # one scene left out (stored as such, as typicality's bad images), not the step
            rows.append({**row, "status": "bad", "problem": exc.problem})
        else:
            maps = typicality_latent_maps(backend, to_model_input(members), prompts, null, draws)
            arrays[str(place)] = maps.cpu().numpy().astype(np.float16)
            rows.append({**row, "height": members.shape[1], "width": members.shape[2]})
        if progress is not None:
            progress.update()
    return arrays, rows


def place_order(row: dict) -> int:
    """The order of a shard's index rows: by the scene's place in the shard (its key)."""
    return int(row["key"])


def run_cotypicality(run, backend: Backend, config: CotypicalityConfig, features: FeatureConfig,
                     progress: bool = True) -> pd.DataFrame:
    """Score every tuple, keep the top sequences, describe and cluster them; returns the sequences.

    Resumable: the shards already in RUN/cotypicality belong to these settings and translations
    (the pipeline's lineage record clears them when those change). The scenes a shard left out
    with a problem that may be fixed since are retried first (``shards.retry_in_shard``): those
    whose source is now readable as listed are scored and their rows replace the bad ones, the
    other rows and maps kept as stored; then the sequences are made again from every shard."""
    dataset = run.step_config("dataset")
    scenes, labels = tuples(run)
    if len(labels) < 2:
        raise ValueError(f"{run.path}: co-typicality needs images translated to at least one other label")
    if scenes.empty:  # e.g. `translate --to norland`: scenes of 2 labels, each a different pair
        raise ValueError(f"{run.path}: co-typicality compares each scene under every label its translations name "
                         f"({', '.join(map(repr, labels))}), and no scene is translated to all the others; run "
                         f"`diffmine translate --to all --run {shell_word(run.path)}` first")
    draws = TypicalityConfig.from_settings(run.config.get("typicality", {}), samples=config.samples, seed=config.seed)
    directory = run.path / "cotypicality"  # cleared by the pipeline when its lineage changes
    retry = images_to_retry(directory)
    todo = missing_shards(directory, len(scenes), config.shard_size)
    backend.denoiser.eval()
    bar = tqdm(total=sum(map(len, retry.values())) + sum(rows.stop - rows.start for _, rows in todo),
               desc="co-typicality", unit="scene", disable=not progress)

    def score(shard_scenes: pd.DataFrame):
        return score_scenes(run, backend, shard_scenes, labels, draws, dataset, bar)

    def shard_scenes(chunk: slice) -> pd.DataFrame:
        return scenes.iloc[chunk].reset_index(drop=True)  # indexed by place in the shard

    shards = dict(positional_shards(len(scenes), config.shard_size))
    for name, retried in retry.items():
        retry_in_shard(directory, name, shard_scenes(shards[name]), retried, score, SHARD_SCHEMA, place_order)
    for name, chunk in todo:
        write_shard(directory, name, *score(shard_scenes(chunk)), SHARD_SCHEMA)
    bar.close()

    sequences = top_sequences(run, directory, labels, config)
    described, unread = sequence_features(run, backend, sequences, labels, features, dataset, progress)
    # the scenes left out, scored in this call or an earlier one, and those whose source changed since
    # it was scored (its sequences go: their members cannot be described): one line each, recorded
    index = read_index(directory)
    bad = index[index["status"] == "bad"]
    run.report_skipped("cotypicality", [Problem(r.image_id, r.path, r.problem) for r in
                                        bad.merge(run.images()[["image_id", "path"]], on="image_id").itertuples()]
                       + unread)
    kept = ~sequences["image_id"].isin([p.image_id for p in unread]).to_numpy()
    if not kept.any():
        raise ValueError(f"{run.path}: no co-typical sequence left to cluster (every scene was left out)")
    sequences, described = sequences[kept].reset_index(drop=True), [block[kept] for block in described]
    reduced = reduce_blocks(described, config.umap_dim, config.seed)
    assignments, centroids = kmeans(reduced, config.k, config.seed)
    ranked = rank_clusters(assignments, centroids, reduced, sequences["cotypicality"].to_numpy())
    sequences = pd.concat([sequences.reset_index(drop=True), ranked.reset_index(drop=True)], axis=1)
    order = sequences.sort_values(["cluster_rank", "rank_in_cluster"], kind="mergesort").index.to_numpy()
    sequences = sequences.loc[order].reset_index(drop=True)
    write_table(pa.Table.from_pandas(sequences, preserve_index=False), directory / "sequences.parquet")
    write_with(directory / "features.npy", lambda f: np.save(f, reduced[order]))  # rows aligned with sequences.parquet
    return sequences


def top_sequences(run, directory, labels: list[str], config: CotypicalityConfig) -> pd.DataFrame:
    """The ``top`` best boxes over all tuples, streaming over shards (memory bounded by ``top``)."""
    best = pd.DataFrame()
    k = config.patch or (run.lineage.get("mine") or {}).get("patch")
    for shard in sorted(directory.glob("shard-*.parquet")):
        rows = []
        for r in pd.read_parquet(shard).itertuples():
            if r.status != "ok":
                continue  # a scene left out: no maps
            pixel_maps = upsample(read_array(directory, shard.stem, r.key), (r.height, r.width))
            side = k or default_patch_size(r.height, r.width)
            for y, x, score, members in cotypical_boxes(pixel_maps, side, config.per_tuple):
                rows.append(dict(image_id=r.image_id, source_label=r.source_label, x0=x, y0=y, x1=x + side, y1=y + side,
                                 cotypicality=score, **{f"typicality_{c}": float(v) for c, v in zip(labels, members)}))
        best = pd.concat([best, pd.DataFrame(rows)], ignore_index=True)
        best = best.sort_values(["cotypicality", "image_id", "y0", "x0"], ascending=[False, True, True, True],
                                kind="mergesort").head(config.top)
    return best.reset_index(drop=True)


def sequence_features(run, backend: Backend, sequences: pd.DataFrame, labels: list[str], config: FeatureConfig,
                      dataset: dict, progress: bool) -> tuple[list[np.ndarray], list[Problem]]:
    """Per label, (N, C) DIFT features of each sequence's member of that label, under its prompt;
    and the scenes that could not be read (their rows stay zero: the caller leaves them out)."""
    blocks: list[np.ndarray | None] = [None] * len(labels)
    unread = []
    prompts = [run.prompt(label) for label in labels]
    images = run.images()
    paths = dict(zip(images["image_id"], images["path"]))
    listed = listed_by_id(images)
    groups = sequences.groupby("image_id", sort=False)
    for image_id, group in tqdm(groups, total=groups.ngroups, desc="sequence features", unit="scene", disable=not progress):
        try:
            members = tuple_pixels(run, image_id, paths[image_id], group["source_label"].iloc[0], labels,
                                   dataset["resolution"], dataset["resize"], backend.latent_factor, listed[image_id])
        except BadImage as exc:
            unread.append(Problem(image_id, paths[image_id], exc.problem))
            continue
        maps = dift_feature_maps(backend, to_model_input(members), prompts, config)  # (M, C, hf, wf)
        boxes = group[["x0", "y0", "x1", "y1"]].to_numpy()
        for m in range(len(labels)):
            pooled = pool_boxes(maps[m], boxes, members.shape[1:3])
            if blocks[m] is None:
                blocks[m] = np.zeros((len(sequences), pooled.shape[1]), np.float32)
            blocks[m][group.index.to_numpy()] = pooled
    return blocks, unread
