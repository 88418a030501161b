"""The point-cloud modality: a set of 3-D points (xyz, optionally with unit normals), as a 3-D scanner or a
mesh sampler gives them.

Loads `.npy` arrays of shape (N, 3) or (N, 6), PLY files (ascii, binary_little_endian or binary_big_endian; the
vertex element's x y z and, when all three are present, nx ny nz; other properties and elements such as faces are
skipped), PLY bytes and in-memory arrays. Preprocessing centres the cloud on its centroid, divides by a fixed
scale and keeps exactly `num_points` points. The tokenizer is OneLLM's `PointPatchEmbed` / Point-BERT's group
embedding: farthest-point centres, k-nearest-neighbour groups, a mini-PointNet per group.

The embedded task: 256 points on the surface of a sphere, cube, cylinder or cone ("shape"), small or large
("size"), under a random 3-D rotation and position with a little jitter, saved as binary PLY with normals."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmalign.modalities.base import (
    MediaError,
    Modality,
    Synthetic,
    check_limit,
    load_npy,
    read_bytes,
    register_modality,
)

PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2",
    "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip
PLY_FORMATS = {"ascii": "", "binary_little_endian": "<", "binary_big_endian": ">"}
XYZ, NORMALS = ("x", "y", "z"), ("nx", "ny", "nz")
# Magic numbers of files that turn up where a point cloud is expected, to say what was given instead.
OTHER_KINDS = {b"\x89PNG": "a PNG image", b"GIF8": "a GIF image", b"\xff\xd8\xff": "a JPEG image",
               b"RIFF": "a RIFF (WAV/AVI) file", b"PK\x03\x04": "a ZIP archive", b"%PDF": "a PDF document"}  # fmt: skip


def _other_kind(head: bytes) -> str:
    kind = next((k for magic, k in OTHER_KINDS.items() if head.startswith(magic)), None)
    return f" (it looks like {kind})" if kind else ""


def _check_cloud(points: np.ndarray, name: str) -> np.ndarray:
    """(N, 3) or (N, 6) finite numbers with N > 0, as float32."""
    if points.dtype.kind not in "fiu":
        raise MediaError(f"{name}: a point cloud holds numbers, got dtype {points.dtype}")
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise MediaError(f"{name}: point cloud must be (N, 3) or (N, 6) (xyz, optionally normals), got {points.shape}")
    if len(points) == 0:
        raise MediaError(f"{name}: empty point cloud (0 points)")
    points = points.astype(np.float32)
    if not np.isfinite(points).all():
        raise MediaError(f"{name}: point cloud holds NaN or infinite values")
    return np.ascontiguousarray(points)


def _ply_header(data: bytes, name: str) -> tuple[str, list[tuple[str, int, list]], int]:
    """The format, the elements [(name, count, [(property, type or None for a list)])] and the body offset."""
    end = data.find(b"end_header")
    newline = data.find(b"\n", end)
    if end < 0 or newline < 0:
        raise MediaError(f"{name}: corrupt PLY: the header has no end_header line")
    try:
        lines = data[:end].decode("ascii").splitlines()
    except UnicodeDecodeError as err:
        raise MediaError(f"{name}: corrupt PLY: the header is not ASCII") from err
    fmt, elements = None, []
    for line in lines[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append((words[1], int(words[2]), []))
            elif words[0] == "property" and words[1] == "list":
                elements[-1][2].append((words[4], None))
            elif words[0] == "property":
                elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
            else:
                raise ValueError(words[0])
        except (IndexError, KeyError, ValueError) as err:
            raise MediaError(f"{name}: corrupt PLY header line {line!r}") from err
    if fmt not in PLY_FORMATS:
        raise MediaError(f"{name}: unsupported PLY format {fmt!r}; known: {sorted(PLY_FORMATS)}")
    return fmt, elements, newline + 1


def _check_points(count: int, name: str) -> None:
    check_limit(name, count, "max_points", f"{count} points")


def _parse_ply(data: bytes, name: str) -> np.ndarray:
    """The vertex element's x y z [nx ny nz] columns as an (N, 3 or 6) array."""
    fmt, elements, start = _ply_header(data, name)
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise MediaError(f"{name}: PLY has no vertex element")
    before, (_, count, props) = elements[: names.index("vertex")], elements[names.index("vertex")]
    _check_points(count, name)  # from the header, before the body is parsed
    prop_names = [p for p, _ in props]
    if not set(XYZ) <= set(prop_names):
        raise MediaError(f"{name}: PLY vertices have no x y z properties (got {prop_names})")
    columns = XYZ + NORMALS if set(NORMALS) <= set(prop_names) else XYZ
    if any(t is None for _, t in props):
        raise MediaError(f"{name}: PLY vertices with list properties are not supported")
    body = data[start:]
    if fmt == "ascii":
        # One line per element instance: the elements before the vertices (rare) are skipped line by line.
        lines = [ln for ln in body.decode("ascii", errors="replace").splitlines() if ln.strip()]
        skip = sum(c for _, c, _ in before)
        rows = lines[skip : skip + count]
        if len(rows) < count:
            raise MediaError(f"{name}: truncated PLY: {len(rows)} of {count} vertices")
        try:
            values = np.array(" ".join(rows).split(), dtype=np.float64)
        except ValueError as err:
            raise MediaError(f"{name}: corrupt PLY: a vertex value is not a number") from err
        if values.size != count * len(props):
            raise MediaError(f"{name}: corrupt PLY: each vertex line must hold {len(props)} values")
        table = values.reshape(count, len(props))
        return np.stack([table[:, prop_names.index(c)] for c in columns], axis=1)
    endian = PLY_FORMATS[fmt]
    offset = 0
    for element, n, element_props in before:
        if any(t is None for _, t in element_props):
            raise MediaError(f"{name}: PLY element {element!r} before the vertices has list properties (unsupported)")
        offset += n * np.dtype([(p, endian + t) for p, t in element_props]).itemsize
    dtype = np.dtype([(p, endian + t) for p, t in props])
    if len(body) < offset + count * dtype.itemsize:
        raise MediaError(f"{name}: truncated PLY: {count} vertices need {count * dtype.itemsize} bytes")
    table = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return np.stack([table[c].astype(np.float64) for c in columns], axis=1)


def load_point(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """A point cloud (N, 3) or (N, 6) float32 (xyz, optionally unit normals) from a .npy or .ply path, PLY or NPY
    bytes, or an array. The file kind is read from its content, not its name."""
    if isinstance(source, np.ndarray):
        return _check_cloud(source, "point cloud array")
    data, name = read_bytes(source, "point cloud")
    if data.startswith(b"\x93NUMPY"):
        points = load_npy(data, name, "NPY point cloud")  # uncompressed: it costs what the file weighs
        if points.ndim:
            _check_points(len(points), name)
    elif data[:4] in (b"ply\n", b"ply\r"):
        points = _parse_ply(data, name)
    else:
        raise MediaError(f"{name}: not a PLY/NPY point cloud{_other_kind(data[:8])}")
    return _check_cloud(points, name)


def save_ply(points: np.ndarray, path: str | Path, *, binary: bool = True) -> None:
    """Write (N, 3) or (N, 6) points (xyz [nx ny nz]) as a float PLY, binary little-endian or ASCII."""
    points = np.asarray(points, dtype="<f4")
    props = XYZ + NORMALS if points.shape[1] == 6 else XYZ
    header = "\n".join(
        ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", f"element vertex {len(points)}"]
        + [f"property float {p}" for p in props]
        + ["end_header", ""]
    ).encode("ascii")
    if binary:
        body = points.tobytes()
    else:
        out = io.StringIO()
        np.savetxt(out, points, fmt="%.9g")
        body = out.getvalue().encode("ascii")
    Path(path).write_bytes(header + body)


def farthest_point_sample(xyz: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of k points spread over each cloud (B, N, 3), starting at point 0 so it is deterministic:
    each next point is the one farthest from those already picked (PointNet++ §3.2)."""
    batch, n, _ = xyz.shape
    picked = torch.zeros(batch, k, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n), float("inf"), device=xyz.device)  # distance to the closest picked point
    farthest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    rows = torch.arange(batch, device=xyz.device)
    for i in range(k):
        picked[:, i] = farthest
        nearest = torch.minimum(nearest, ((xyz - xyz[rows, farthest][:, None]) ** 2).sum(-1))
        farthest = nearest.argmax(-1)
    return picked


def preprocess_point(raw: np.ndarray | torch.Tensor, encoder) -> torch.Tensor:
    """One cloud as the encoder's fixed input: (num_points, 6) with normals when `encoder.use_normals`, else
    (num_points, 3). Centred on the centroid; then divided by `encoder.scale`, or by the largest radius when
    `encoder.unit_sphere` (OneLLM's pc_norm, for data whose absolute size carries no meaning)."""
    x = torch.as_tensor(raw, dtype=torch.float32)
    if encoder.use_normals and x.shape[1] < 6:
        raise MediaError(f"the point tokenizer reads normals (use_normals=True) but the cloud is {tuple(x.shape)}")
    xyz = x[:, :3] - x[:, :3].mean(0)
    if encoder.unit_sphere:
        xyz = xyz / xyz.norm(dim=1).max().clamp_min(1e-8)
    else:
        # A fixed scale, not the unit sphere: rescaling every cloud to radius 1 would erase its size, and size is
        # one of the things asked about it (the embedded "small" / "large").
        xyz = xyz / encoder.scale
    x = torch.cat([xyz, x[:, 3:6]], dim=1) if encoder.use_normals else xyz
    n = encoder.num_points
    if len(x) > n:
        return x[farthest_point_sample(xyz[None], n)[0]]
    return x[torch.arange(n) % len(x)]  # fewer points: repeat them (the max-pooled groups do not see repeats)


class PointTokenizer(nn.Module):
    """The onellm family's point tokenizer (OneLLM `PointPatchEmbed`, Point-BERT §3.1): farthest-point sampling
    picks `groups` centres, each gathers its `neighbours` nearest points, and a mini-PointNet (shared MLP on the
    coordinates relative to the centre, max-pooled, Point-BERT's two-stage form) turns each group into one token;
    an MLP of the centre's xyz is its position. A learned class token comes first.
    (items, num_points, 3 or 6) -> (items, 1 + groups, width)."""

    def __init__(
        self,
        width: int,
        *,
        num_points: int = 256,
        groups: int = 32,
        neighbours: int = 16,
        use_normals: bool = False,
        scale: float = 1.0,
        unit_sphere: bool = False,
        channels: int = 128,
    ):
        super().__init__()
        if not 0 < groups <= num_points or not 0 < neighbours <= num_points:
            raise ValueError(f"groups ({groups}) and neighbours ({neighbours}) must be in 1..num_points ({num_points})")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.num_points, self.groups, self.neighbours = num_points, groups, neighbours
        self.use_normals, self.scale, self.unit_sphere = use_normals, scale, unit_sphere
        self.in_channels = 6 if use_normals else 3
        self.hidden_size = width
        self.num_tokens = 1 + groups
        self.first = nn.Sequential(nn.Linear(self.in_channels, 64), nn.GELU(), nn.Linear(64, channels))
        self.second = nn.Sequential(nn.Linear(2 * channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, width))
        self.pos = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.shape[-1] != self.in_channels:
            raise ValueError(f"expected (items, points, {self.in_channels}) clouds, got {tuple(points.shape)}")
        xyz = points[..., :3]
        rows = torch.arange(len(points), device=points.device)[:, None]
        with torch.no_grad():  # which points form the groups is a choice, not a function to differentiate
            centre_idx = farthest_point_sample(xyz, self.groups)  # (items, groups)
            centres = xyz[rows, centre_idx]  # (items, groups, 3)
            knn = torch.cdist(centres, xyz).topk(self.neighbours, largest=False).indices  # (items, groups, k)
        group = points[rows[:, :, None], knn]  # (items, groups, k, channels)
        local = torch.cat([group[..., :3] - centres[:, :, None], group[..., 3:]], dim=-1)
        feat = self.first(local)  # (items, groups, k, channels)
        pooled = feat.max(dim=2, keepdim=True).values.expand_as(feat)  # each point sees its group's summary
        tokens = self.second(torch.cat([feat, pooled], dim=-1)).max(dim=2).values  # (items, groups, width)
        tokens = tokens + self.pos(centres)
        cls = (self.cls + self.cls_pos).expand(len(points), -1, -1)
        return torch.cat([cls, tokens], dim=1)  # (items, 1 + groups, width)


def point_tokenizer(universal, settings: dict) -> PointTokenizer:
    return PointTokenizer(universal.hidden_size, **settings)


# ---- the embedded task -------------------------------------------------------------------------------------------
SHAPES = ("sphere", "cube", "cylinder", "cone")
SIZES = {"small": (0.3, 0.45), "large": (0.75, 1.0)}  # the radius of the sphere around the shape
NUM_POINTS = 256
QUESTIONS = {
    "shape": ["what shape is it ?", "which shape is the point cloud ?", "what kind of object is this ?"],
    "size": ["is it small or large ?", "what size is the object ?", "how big is the shape ?"],
}
CAPTION_PREFIXES = ["", "a point cloud of ", "the surface of ", "points on "]


def _disk(n: int, radius: float, g: np.random.Generator) -> np.ndarray:
    r, theta = radius * np.sqrt(g.random(n)), g.uniform(0, 2 * np.pi, n)
    return np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)


def sample_surface(shape: str, n: int, g: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` points uniform over the surface of `shape` and their outward normals, each (n, 3). Every shape fits
    the unit sphere with some points on it, so one size parameter scales them all alike."""
    if shape == "sphere":
        p = g.normal(size=(n, 3))
        p /= np.linalg.norm(p, axis=1, keepdims=True)
        return p, p.copy()
    if shape == "cube":
        half = 1 / np.sqrt(3)
        axis, sign = g.integers(0, 3, n), g.choice([-1.0, 1.0], n)
        p = g.uniform(-half, half, (n, 3))
        normal = np.zeros((n, 3))
        p[np.arange(n), axis] = sign * half
        normal[np.arange(n), axis] = sign
        return p, normal
    if shape == "cylinder":
        r, h = 0.6, 0.8  # radius, half-height: r^2 + h^2 = 1
        side = g.random(n) < (2 * h) / (2 * h + r)  # the side's share of the area: 4 pi r h / (4 pi r h + 2 pi r^2)
        theta = g.uniform(0, 2 * np.pi, n)
        p = np.stack([r * np.cos(theta), r * np.sin(theta), g.uniform(-h, h, n)], axis=1)
        normal = np.stack([np.cos(theta), np.sin(theta), np.zeros(n)], axis=1)
        cap = ~side
        p[cap, :2] = _disk(int(cap.sum()), r, g)
        p[cap, 2] = g.choice([-h, h], int(cap.sum()))
        normal[cap] = 0.0
        normal[cap, 2] = np.sign(p[cap, 2])
        return p, normal
    if shape == "cone":
        r, base, apex = 0.8, -0.6, 1.0  # base radius; apex and base rim both on the unit sphere
        height = apex - base
        slant = np.hypot(r, height)
        side = g.random(n) < slant / (slant + r)  # pi r s / (pi r s + pi r^2)
        t = np.sqrt(g.random(n))  # distance from the apex as a fraction of the height: the area grows as t
        theta = g.uniform(0, 2 * np.pi, n)
        p = np.stack([r * t * np.cos(theta), r * t * np.sin(theta), apex - height * t], axis=1)
        normal = np.stack([height * np.cos(theta), height * np.sin(theta), np.full(n, r)], axis=1) / slant
        bottom = ~side
        p[bottom, :2] = _disk(int(bottom.sum()), r, g)
        p[bottom, 2] = base
        normal[bottom] = [0.0, 0.0, -1.0]
        return p, normal
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def random_rotation(g: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniform over SO(3): QR of a Gaussian matrix, signs fixed so the law is Haar."""
    q, r = np.linalg.qr(g.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_point(rng: random.Random) -> tuple[np.ndarray, dict[str, str]]:
    """(256, 6) float32 xyz + normals of a rotated, placed, jittered shape, and its shape and size."""
    g = np.random.default_rng(rng.randrange(2**32))
    shape, size = rng.choice(SHAPES), rng.choice(list(SIZES))
    points, normals = sample_surface(shape, NUM_POINTS, g)
    rotation = random_rotation(g)
    points = g.uniform(*SIZES[size]) * points @ rotation.T + g.uniform(-0.5, 0.5, 3)
    points += g.normal(0, 0.01, points.shape)
    cloud = np.concatenate([points, normals @ rotation.T], axis=1).astype(np.float32)
    return cloud, {"shape": shape, "size": size}


def point_caption(answers: dict[str, str], rng: random.Random) -> str:
    return f"{rng.choice(CAPTION_PREFIXES)}a {answers['size']} {answers['shape']}"


POINT = register_modality(
    Modality(
        name="point",
        placeholder="<point>",
        record_key="point",
        default_encoder="modality-transformer",
        load=load_point,
        preprocess=preprocess_point,
        tokenizer=point_tokenizer,
        synthetic=Synthetic(
            make=make_point,
            save=save_ply,
            suffix=".ply",
            questions=QUESTIONS,
            caption=point_caption,
        ),
    )
)
