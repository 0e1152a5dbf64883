"""The embedded default dataset: synthetic, seeded, and shaped like real recommendation logs.

Why synthetic: the pipeline must run end to end with no download and no licensed data, and its
algorithms must have something to learn. The generator therefore plants the structure real logs have,
so that popularity, collaborative and content models each have something of their own to find:

- latent taste clusters: every item belongs to one cluster, every user mainly to one; the cluster
  decides an item's genres, tags, words (title/text) and a user's age, gender and occupation;
- Zipf-like item popularity and heavy-tailed (log-normal) user activity;
- time: two years of timestamps; items are released over time (and never consumed before release);
  users are active over a window of their own; cluster popularity drifts (new users join rising
  clusters, and users' off-taste choices follow the clusters in fashion at that time);
- ratings 1..5, higher when the item's cluster is the user's, with user/item biases and noise.

Everything is vectorised numpy (no Python loop over interactions; draws in chunks of 2^20), so even
10^7 interactions take seconds, in bounded memory. The same config always gives identical frames.
Frames are typed (int32 ids, int8 ratings, int64 unix-second timestamps, string text columns);
validation coerces whatever a source gives, so nothing here has to look like a file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuserec.config import SyntheticConfig
from fuserec.data.raw import LINE_COL, SOURCE_COL, RawSource

SOURCE = "synthetic"
START = 1_609_459_200  # 2021-01-01 UTC: the log covers START .. START + SPAN
DAY = 86_400
N_DAYS = 2 * 365
SPAN = N_DAYS * DAY
_TIME_BINS = 24  # drift is evaluated per month
_OWN_CLUSTER = 0.70  # share of choices from the user's own cluster
_FASHION = 0.20  # ... from a cluster drawn by the (drifting) cluster popularity at that time
# the rest (10%) is plain popularity over all released items
_ZIPF = 1.0
_CHUNK = 1 << 20  # interactions drawn at a time

GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
# Per genre: words for titles and text, and tags. Clusters prefer a few genres, so words and tags
# carry the cluster too, which is what content-based models pick up.
_GENRE_WORDS = (
    ("chase", "explosion", "mercenary", "heist", "showdown", "agent"),
    ("quest", "island", "treasure", "voyage", "jungle", "map"),
    ("cartoon", "puppet", "dragon", "toy", "forest", "robot"),
    ("family", "puppy", "school", "holiday", "friendship", "magic"),
    ("wedding", "roommate", "mixup", "party", "neighbour", "road-trip"),
    ("mob", "detective", "robbery", "gangster", "witness", "precinct"),
    ("archive", "interview", "history", "nature", "musician", "expedition"),
    ("memory", "grief", "marriage", "secret", "village", "inheritance"),
    ("kingdom", "wizard", "sword", "prophecy", "fairy", "curse"),
    ("rain", "shadow", "femme-fatale", "alley", "cigarette", "informant"),
    ("ghost", "cabin", "zombie", "asylum", "ritual", "scream"),
    ("stage", "song", "dancer", "broadway", "band", "chorus"),
    ("clue", "manor", "disappearance", "riddle", "butler", "alibi"),
    ("letter", "summer", "paris", "heartbreak", "proposal", "dance"),
    ("starship", "android", "galaxy", "colony", "time-loop", "alien"),
    ("conspiracy", "hostage", "stalker", "countdown", "spy", "bomb"),
    ("battalion", "trench", "pilot", "resistance", "siege", "general"),
    ("sheriff", "outlaw", "frontier", "saloon", "ranch", "gold"),
)
_GENRE_TAGS = (
    ("fast-paced", "stunts", "car chase"),
    ("exotic locations", "epic", "survival"),
    ("pixar-like", "talking animals", "hand-drawn"),
    ("kids", "wholesome", "coming of age"),
    ("witty", "slapstick", "feel-good"),
    ("heist", "noir-ish", "organized crime"),
    ("true story", "informative", "biography"),
    ("tearjerker", "character study", "slow burn"),
    ("mythology", "magic", "world-building"),
    ("black and white", "classic", "moody"),
    ("gore", "jump scares", "creepy"),
    ("soundtrack", "singing", "choreography"),
    ("whodunit", "plot twist", "puzzle"),
    ("chick flick", "love triangle", "romantic"),
    ("space", "dystopia", "time travel"),
    ("suspense", "tense", "conspiracy"),
    ("world war ii", "military", "anti-war"),
    ("cowboys", "gunfight", "desert"),
)
_COMMON_TAGS = ("based on a book", "visually appealing", "overrated", "cult film", "must see", "boring")
_TAGS = tuple(t for tags in _GENRE_TAGS for t in tags) + _COMMON_TAGS  # 60 tags: fits a uint64 mask
_ADJECTIVES = (
    "Last", "Silent", "Broken", "Golden", "Hidden", "Lost", "Final", "Crimson", "Midnight", "Wild",
    "Little", "Dark", "Bright", "Secret", "Endless", "Frozen", "Burning", "Distant", "Electric", "Quiet",
)  # fmt: skip
_STORY = ("a story of", "a tale about", "the saga of", "a film about", "an account of", "a portrait of")
OCCUPATIONS = (
    "student", "engineer", "programmer", "educator", "writer", "artist", "administrator", "librarian",
    "scientist", "healthcare", "executive", "marketing", "technician", "entertainment", "lawyer",
    "salesman", "retired", "homemaker", "doctor", "other", "none",
)  # fmt: skip


def generate(cfg: SyntheticConfig) -> RawSource:
    """Generate interactions, items and users from ``cfg`` (same ``cfg`` -> identical frames).

    Sizes: exactly ``cfg.n_interactions`` interactions; when not given, ``n_users = n // 50`` and
    ``n_items = n // 30`` (50 interactions per user and 30 per item on average: MovieLens-like
    sparsity at every size), each at least 50 so tiny configs still have a catalogue. Raises
    ValueError when the users x items grid cannot hold that many distinct pairs, or when there are
    more clusters than items.
    """
    n = int(cfg.n_interactions)
    n_users = int(cfg.n_users) if cfg.n_users is not None else max(50, n // 50)
    n_items = int(cfg.n_items) if cfg.n_items is not None else max(50, n // 30)
    k = int(cfg.n_clusters)
    if n > n_users * n_items:
        raise ValueError(
            f"synthetic: {n} interactions do not fit {n_users} users x {n_items} items as distinct pairs; "
            f"raise data.synthetic.n_users / n_items or lower n_interactions"
        )
    if k > n_items:
        raise ValueError(f"synthetic: n_clusters={k} exceeds n_items={n_items}; every cluster needs an item")
    rng = np.random.default_rng(cfg.seed % 2**63)

    world = _World.make(rng, k)
    items, item_cluster, release, popularity = _make_items(rng, world, n_items)
    users, user_cluster, counts, active = _make_users(rng, world, n_users, n)
    interactions = _make_interactions(
        rng, world, n, user_cluster, _cap(rng, counts, n_items), active, item_cluster, release, popularity
    )
    return RawSource(
        interactions=interactions,
        items=items,
        users=users,
        files={"interactions": SOURCE, "items": SOURCE, "users": SOURCE},
    )


class _World:
    """Cluster-level structure every entity is drawn from."""

    def __init__(
        self,
        size: np.ndarray,
        genre_pref: np.ndarray,
        drift_cdf: np.ndarray,
        age: np.ndarray,
        male: np.ndarray,
        occupation_cdf: np.ndarray,
    ) -> None:
        self.k = len(size)
        self.size = size  # share of items per cluster
        self.genre_pref = genre_pref  # (k, n_genres) probabilities
        self.drift_cdf = drift_cdf  # (_TIME_BINS, k) CDF of cluster popularity per month
        self.age = age  # mean age per cluster
        self.male = male  # P(gender = M) per cluster
        self.occupation_cdf = occupation_cdf  # (k, n_occupations)

    @classmethod
    def make(cls, rng: np.random.Generator, k: int) -> _World:
        size = rng.dirichlet(np.full(k, 4.0))
        # Each cluster gets a distinct main genre (while there are genres left), a second one, and a
        # little of everything else, so genres identify clusters without being a one-to-one label.
        g = len(GENRES)
        main = np.resize(rng.permutation(g), k)
        second = (main + rng.integers(1, g, size=k)) % g
        pref = 0.25 * rng.dirichlet(np.full(g, 0.5), size=k)
        pref[np.arange(k), main] += 0.5
        pref[np.arange(k), second] += 0.25
        # Drift: log popularity of each cluster = trend + seasonal wave over the two years.
        t = (np.arange(_TIME_BINS) + 0.5) / _TIME_BINS
        trend = rng.normal(0.0, 0.8, size=k)
        phase = rng.uniform(0, 2 * np.pi, size=k)
        logw = np.log(size)[None, :] + trend[None, :] * (t[:, None] - 0.5) * 2
        logw += 0.3 * np.sin(2 * np.pi * t[:, None] + phase[None, :])
        w = np.exp(logw)
        drift_cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
        age = rng.uniform(20, 50, size=k)
        male = rng.uniform(0.35, 0.85, size=k)
        occ = 0.3 / len(OCCUPATIONS) + 0.7 * rng.dirichlet(np.full(len(OCCUPATIONS), 0.3), size=k)
        return cls(size, pref, drift_cdf, age, male, np.cumsum(occ / occ.sum(axis=1, keepdims=True), axis=1))


def _make_items(
    rng: np.random.Generator, world: _World, n_items: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Items with cluster, popularity weight, release time, genres, tags, title and text.

    Returns (items frame, cluster per item, release day per item (days after START, negative for the
    back catalogue; an item is released at 00:00 UTC of its day), popularity weight per item).
    """
    k = world.k
    cluster = rng.choice(k, size=n_items, p=world.size).astype(np.int32)
    cluster[:k] = np.arange(k)  # every cluster has at least one item
    # Half the catalogue predates the log (release up to decades earlier), half is released during it.
    old = rng.random(n_items) < 0.5
    release = np.where(
        old,
        -np.ceil(np.minimum(rng.exponential(8 * 365, n_items), 80 * 365)) - 1,
        rng.integers(0, N_DAYS, n_items),
    ).astype(np.int64)
    # The most popular item of each cluster is back catalogue, so no cluster is ever empty of choices.
    rank = rng.permutation(n_items)  # 0 = most popular
    popularity = (rank + 1.0) ** -_ZIPF  # Zipf-like
    order = np.lexsort((rank, cluster))
    first = np.searchsorted(cluster[order], np.arange(k))
    top = order[first]
    release[top] = np.minimum(release[top], -1)

    # Genres: 1-3 per item from its cluster's preferences; kept as up to 3 distinct indices.
    n_genres = rng.choice(3, size=n_items, p=[0.45, 0.35, 0.20]) + 1
    genre_cdf = np.cumsum(world.genre_pref, axis=1)
    picks = _inverse_cdf(genre_cdf, cluster[:, None], rng.random((n_items, 3)))
    picks[np.arange(3)[None, :] >= n_genres[:, None]] = -1
    picks[:, 1][picks[:, 1] == picks[:, 0]] = -1
    picks[:, 2][(picks[:, 2] == picks[:, 0]) | (picks[:, 2] == picks[:, 1])] = -1
    genre_mask = np.zeros(n_items, dtype=np.uint64)
    for j in range(3):
        on = picks[:, j] >= 0
        genre_mask[on] |= np.uint64(1) << picks[on, j].astype(np.uint64)
    genres = _mask_labels(genre_mask, GENRES)

    # A random one of the item's genres drives each word and tag.
    have = (picks >= 0).sum(axis=1, keepdims=True)
    valid_first = np.sort(picks, axis=1)[:, ::-1]

    def own_genre(n_draws: int) -> np.ndarray:
        slot = (rng.random((n_items, n_draws)) * have).astype(np.int64)
        return np.take_along_axis(valid_first, slot, axis=1)

    # Tags: popular items are tagged more (as in MovieLens); 0-4 tags, mostly from their genres.
    rank_pct = rank / max(n_items - 1, 1)
    n_tags = np.minimum(rng.poisson(3.0 * (1.0 - rank_pct) + 0.3), 4)
    tag_genre = own_genre(4)
    tag_idx = tag_genre * 3 + rng.integers(0, 3, size=(n_items, 4))
    common = rng.random((n_items, 4)) < 0.15
    tag_idx[common] = len(_GENRE_TAGS) * 3 + rng.integers(0, len(_COMMON_TAGS), size=int(common.sum()))
    tag_mask = np.zeros(n_items, dtype=np.uint64)
    for j in range(4):
        on = j < n_tags
        tag_mask[on] |= np.uint64(1) << tag_idx[on, j].astype(np.uint64)
    tags = _mask_labels(tag_mask, _TAGS)

    # Title "Adjective Noun (year)" and text "a tale about w1, w2 and w3; genre, genre", words drawn
    # from the item's genres (object arrays of shared word strings: no per-item Python work but joins).
    words = np.array(_GENRE_WORDS, dtype=object)
    capitalised = np.array([[w.capitalize() for w in row] for row in _GENRE_WORDS], dtype=object)
    word_genre, word_pick = own_genre(4), rng.integers(0, words.shape[1], size=(n_items, 4))
    w = words[word_genre, word_pick]
    adjective = np.array(_ADJECTIVES, dtype=object)[rng.integers(0, len(_ADJECTIVES), size=n_items)]
    year = _year(START + release * DAY)
    title = (
        adjective
        + " "
        + capitalised[word_genre[:, 0], word_pick[:, 0]]
        + " ("
        + year.astype(str).astype(object)
        + ")"
    )
    story = np.array(_STORY, dtype=object)[rng.integers(0, len(_STORY), size=n_items)]
    genre_text = _mask_labels(genre_mask, tuple(g.lower() for g in GENRES), ", ")
    text = story + " " + w[:, 1] + ", " + w[:, 2] + " and " + w[:, 3] + "; " + genre_text

    frame = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int32),
            "title": title,
            "genres": genres,
            "tags": tags,
            "text": text,
            "year": year,
        }
    )
    _add_provenance(frame)
    return frame, cluster, release, popularity


def _make_users(
    rng: np.random.Generator, world: _World, n_users: int, n: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Users with cluster, attributes, activity (interaction count) and active time window."""
    # Active window: start anywhere in the log (a third already active at its start), heavy users stay
    # longer. Users join the clusters that are in fashion when they start.
    start = np.clip(rng.uniform(-0.5, 0.97, n_users), 0.0, None)
    time_bin = np.minimum((start * _TIME_BINS).astype(np.int64), _TIME_BINS - 1)
    cluster = _inverse_cdf(world.drift_cdf, time_bin, rng.random(n_users)).astype(np.int32)

    counts = _activity(rng, n_users, n)
    share = np.argsort(np.argsort(counts)) / max(n_users - 1, 1)  # activity percentile
    length = np.clip(rng.beta(0.8, 2.0, n_users) * (0.3 + share), 0.01, 1.0)
    end = np.minimum(start + length, 1.0)
    start = np.minimum(start, end - 0.005)

    age = np.clip(np.rint(world.age[cluster] + rng.normal(0, 8, n_users)), 10, 80).astype(np.int32)
    male = rng.random(n_users) < world.male[cluster]
    occupation = _inverse_cdf(world.occupation_cdf, cluster, rng.random(n_users))
    frame = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype=np.int32),
            "age": age,
            "gender": np.where(male, "M", "F"),
            "occupation": np.array(OCCUPATIONS)[occupation],
        }
    )
    _add_provenance(frame)
    return frame, cluster, counts, (start * SPAN, end * SPAN)


def _activity(rng: np.random.Generator, n_users: int, n: int) -> np.ndarray:
    """Log-normal (heavy-tailed) interaction counts summing to exactly ``n``.

    Every user gets a few interactions (5 when there are enough) so every user can be split and evaluated.
    """
    base = min(5, n // n_users)
    weight = rng.lognormal(0.0, 1.1, n_users)
    counts = base + rng.multinomial(n - base * n_users, weight / weight.sum())
    return counts.astype(np.int64)


def _make_interactions(
    rng: np.random.Generator,
    world: _World,
    n: int,
    user_cluster: np.ndarray,
    counts: np.ndarray,
    active: tuple[np.ndarray, np.ndarray],
    item_cluster: np.ndarray,
    release: np.ndarray,
    popularity: np.ndarray,
) -> pd.DataFrame:
    """Interactions of each user (``counts``), within the user's active window, as distinct pairs."""
    n_users, n_items = len(user_cluster), len(item_cluster)
    user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    lo, hi = active
    t = (lo[user] + rng.random(n, dtype=np.float32) * (hi - lo)[user]).astype(np.int64)
    # Each user's history in time order: users are already contiguous, so sorting user-major keys sorts
    # the times within each user (cheaper than an argsort and a permutation of every column).
    block = user.astype(np.int64) * (SPAN + 1)
    t = np.sort(block + np.clip(t, 0, SPAN)) - block
    del block

    samplers = (
        _ItemSampler(item_cluster, release, popularity, world.k),
        _ItemSampler(np.zeros(n_items, dtype=np.int32), release, popularity, 1),
    )
    item = _choose(rng, world, samplers, user, t, user_cluster)
    item = _make_unique(rng, world, samplers, user, t, item, user_cluster, n_items)
    released_at = release[item] * DAY
    late = t < released_at  # only the last-resort fallback can pick an item released later
    if late.any():
        t = np.maximum(t, released_at)
        order = np.lexsort((t, user))
        user, item, t = user[order], item[order], t[order]
    del released_at

    # Ratings: own-cluster items are liked more; user and item biases; noise.
    match = item_cluster[item] == user_cluster[user]
    user_bias = rng.normal(0.0, 0.45, n_users).astype(np.float32)
    item_bias = (rng.normal(0.0, 0.35, n_items) + 0.15 * np.log10(popularity / popularity.mean())).astype(
        np.float32
    )
    score = rng.normal(0.0, 0.85, n).astype(np.float32)
    score += user_bias[user]
    score += item_bias[item]
    score += np.float32(1.1) * match + np.float32(2.85)
    del match
    rating = np.clip(np.rint(score), 1, 5).astype(np.int8)
    del score
    t += START

    frame = pd.DataFrame(
        {"user_id": user, "item_id": item.astype(np.int32), "rating": rating, "timestamp": t}, copy=False
    )
    _add_provenance(frame)
    return frame


class _ItemSampler:
    """Draw items by popularity among those released by a given day, within a group (cluster).

    Items are sorted by (group, release day), so the items of a group released by day ``d`` are a
    prefix of the group's block, whose end is a table lookup (``ends[group, d]``). A popularity-weighted
    draw from a prefix inverts the running sum of weights; binary search over it for every one of 10^7
    draws would be slow (cache misses), so a guide table (the first item of each of 2 x block-size
    equal-mass buckets) lands each draw on or just before its item, and a few vectorised steps finish.
    """

    def __init__(self, group: np.ndarray, release_day: np.ndarray, popularity: np.ndarray, n_groups: int):
        self.order = np.lexsort((release_day, group))
        sorted_group = group[self.order].astype(np.int64)
        self.first = np.searchsorted(sorted_group, np.arange(n_groups + 1))  # block bounds
        self.cum = np.cumsum(popularity[self.order])
        self.below = np.concatenate(([0.0], self.cum))[self.first[:-1]]  # weight before each block
        self.total = self.cum[self.first[1:] - 1] - self.below  # every block holds >= 1 item
        day = release_day[self.order]
        width = np.int64(day.max() - day.min() + N_DAYS + 2)
        keys = sorted_group * width + (day - day.min())
        wanted = np.arange(n_groups)[:, None] * width + (np.arange(N_DAYS + 1)[None, :] - day.min())
        self.ends = np.searchsorted(keys, wanted, side="right")  # (n_groups, N_DAYS + 1), exclusive
        sizes = np.diff(self.first)
        self.buckets = 2 * sizes
        self.guide_start = np.concatenate(([0], np.cumsum(self.buckets)[:-1]))
        owner = np.repeat(np.arange(n_groups), self.buckets)
        within = np.arange(int(self.buckets.sum())) - self.guide_start[owner]
        bounds = self.below[owner] + self.total[owner] * within / self.buckets[owner]
        self.guide = np.searchsorted(self.cum, bounds, side="right")  # bounds ascend: fast

    def draw(self, rng: np.random.Generator, group: np.ndarray, day: np.ndarray) -> np.ndarray:
        group = group.astype(np.int64)
        end = np.maximum(self.ends[group, day], self.first[group] + 1)  # oldest item: back catalogue
        below = self.below[group]
        target = below + rng.random(len(group)) * (self.cum[end - 1] - below)
        bucket = ((target - below) / self.total[group] * self.buckets[group]).astype(np.int64)
        pos = self.guide[self.guide_start[group] + np.minimum(bucket, self.buckets[group] - 1)]
        pos = np.clip(pos, self.first[group], end - 1)
        # First position whose running sum exceeds the target (== searchsorted side="right").
        todo = np.flatnonzero((self.cum[pos] <= target) & (pos < end - 1))
        while len(todo):
            pos[todo] += 1
            todo = todo[(self.cum[pos[todo]] <= target[todo]) & (pos[todo] < end[todo] - 1)]
        return self.order[pos]

    def draw_uniform(self, rng: np.random.Generator, day: np.ndarray) -> np.ndarray:
        """Any item of group 0 released by ``day``, all equally likely (for redrawing repeats)."""
        end = np.maximum(self.ends[0, day], 1)
        return self.order[(rng.random(len(day)) * end).astype(np.int64)]


def _choose(
    rng: np.random.Generator,
    world: _World,
    samplers: tuple[_ItemSampler, _ItemSampler],
    user: np.ndarray,
    t: np.ndarray,
    user_cluster: np.ndarray,
) -> np.ndarray:
    """One item per interaction: own cluster, else a cluster in fashion at ``t``, else any popular item.

    Works in chunks so that the temporaries of 10^7 draws never coexist (peak memory stays small).
    """
    item = np.empty(len(user), dtype=np.int32)
    for lo in range(0, len(user), _CHUNK):
        u, tt = user[lo : lo + _CHUNK], t[lo : lo + _CHUNK]
        m = len(u)
        mode = rng.random(m, dtype=np.float32)
        time_bin = np.minimum(tt * _TIME_BINS // SPAN, _TIME_BINS - 1)
        fashion = _inverse_cdf(world.drift_cdf, time_bin, rng.random(m))
        cluster = np.where(mode < _OWN_CLUSTER, user_cluster[u], fashion)
        day = tt // DAY
        chosen = samplers[0].draw(rng, cluster, day)
        anywhere = mode >= _OWN_CLUSTER + _FASHION
        if anywhere.any():
            chosen[anywhere] = samplers[1].draw(rng, np.zeros(int(anywhere.sum()), np.int64), day[anywhere])
        item[lo : lo + m] = chosen
    return item


def _make_unique(
    rng: np.random.Generator,
    world: _World,
    samplers: tuple[_ItemSampler, _ItemSampler],
    user: np.ndarray,
    t: np.ndarray,
    item: np.ndarray,
    user_cluster: np.ndarray,
    n_items: int,
) -> np.ndarray:
    """Redraw repeated (user, item) pairs until every pair is distinct.

    The repeats are redrawn with the same model a few rounds (only the repeats, checked against the
    accepted pairs by binary search); the few left after that (users who consumed most of what was
    released) get a uniformly random released item, and any left then get an unseen item directly.
    """
    n_items64 = np.int64(n_items)
    key = user.astype(np.int64) * n_items64 + item
    accepted = np.sort(key)
    again = accepted[1:] == accepted[:-1]
    repeated = accepted[1:][again]
    repeated = repeated[np.concatenate(([True], repeated[1:] != repeated[:-1]))]  # sorted: dedupe
    accepted = accepted[np.concatenate(([True], ~again))]
    del again
    todo = np.zeros(0, dtype=np.int64)
    if len(repeated):  # rows holding a repeated pair, except the first row of each pair
        parts = []
        for lo in range(0, len(key), _CHUNK):  # chunked: no n-sized temporaries
            chunk = key[lo : lo + _CHUNK]
            pos = np.minimum(np.searchsorted(repeated, chunk), len(repeated) - 1)
            parts.append(lo + np.flatnonzero(repeated[pos] == chunk))
        rows = np.concatenate(parts)
        first = np.unique(key[rows], return_index=True)[1]
        todo = np.delete(rows, first)
    del key
    for round_ in range(40):
        if len(todo) == 0:
            break
        if round_ < 10:
            new = _choose(rng, world, samplers, user[todo], t[todo], user_cluster)
        else:  # any released item, equally likely
            new = samplers[1].draw_uniform(rng, t[todo] // DAY)
        new_key = user[todo].astype(np.int64) * n_items64 + new
        pos = np.searchsorted(accepted, new_key)
        seen = (pos < len(accepted)) & (accepted[np.minimum(pos, len(accepted) - 1)] == new_key)
        _, first = np.unique(new_key, return_index=True)
        fresh = np.zeros(len(todo), dtype=bool)
        fresh[first] = True
        ok = fresh & ~seen
        item[todo[ok]] = new[ok]
        added = np.sort(new_key[ok])
        accepted = np.insert(accepted, np.searchsorted(accepted, added), added)
        todo = todo[~ok]
    for u in np.unique(user[todo]):  # rarely reached: users who hold nearly every item
        rows = todo[user[todo] == u]
        lo, hi = np.searchsorted(accepted, [u * n_items64, (u + 1) * n_items64])
        free = np.setdiff1d(np.arange(n_items), accepted[lo:hi] - u * n_items64)
        item[rows] = rng.choice(free, size=len(rows), replace=False)
    return item


def _cap(rng: np.random.Generator, counts: np.ndarray, n_items: int) -> np.ndarray:
    """Limit each user's count so distinct pairs stay easy to draw, moving the excess to other users.

    The cap is 60% of the catalogue, or more when the grid is so dense that it must be.
    """
    n = int(counts.sum())
    cap = min(n_items, max(int(0.6 * n_items), -(-n // len(counts))))
    counts = counts.copy()
    while (excess := int(np.maximum(counts - cap, 0).sum())) > 0:
        counts = np.minimum(counts, cap)
        room = (cap - counts).astype(np.float64)
        counts += rng.multinomial(excess, room / room.sum())
    return counts


def _inverse_cdf(cdf: np.ndarray, row: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Sample category ``j`` with ``cdf[row, j-1] <= u < cdf[row, j]`` without materialising rows.

    The rows are laid end to end as ``row + cdf`` (strictly increasing across rows), so one
    ``searchsorted`` of ``row + u`` samples every draw at once.
    """
    n_rows, n_cols = cdf.shape
    flat = (np.arange(n_rows)[:, None] + np.minimum(cdf, 1.0)).ravel()
    flat[n_cols - 1 :: n_cols] = np.arange(1, n_rows + 1)  # each row's CDF ends at exactly 1
    row = np.asarray(row, dtype=np.int64)
    pos = np.searchsorted(flat, row + np.minimum(u, 1 - 1e-12), side="right")
    return np.minimum(pos - row * n_cols, n_cols - 1).astype(np.int64)


def _mask_labels(mask: np.ndarray, names: tuple[str, ...], sep: str = "|") -> np.ndarray:
    """Bit masks -> ``sep``-joined names (in vocabulary order); each distinct mask is joined once."""
    codes, inverse = np.unique(mask, return_inverse=True)
    labels = np.array(
        [sep.join(name for b, name in enumerate(names) if int(code) >> b & 1) for code in codes], dtype=object
    )
    return labels[inverse.reshape(-1)]


def _year(seconds: np.ndarray) -> np.ndarray:
    return seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int32) + 1970


def _add_provenance(frame: pd.DataFrame) -> None:
    """``_source`` = "synthetic", ``_line`` = 1-based row number, as the file loaders provide."""
    frame[SOURCE_COL] = _constant_strings(SOURCE, len(frame))
    frame[LINE_COL] = np.arange(1, len(frame) + 1, dtype=np.int64)


def _constant_strings(value: str, n: int) -> pd.api.extensions.ExtensionArray | np.ndarray:
    """A string column holding ``value`` n times, built in Arrow directly.

    Assigning the scalar (``frame[col] = value``) goes through an n-element Python object array first:
    at 10^7 rows that is hundreds of MB of extra peak memory, for a constant.
    """
    try:
        import pyarrow as pa

        arrow = pa.repeat(pa.scalar(value, pa.large_string()), n)
        return pd.array(arrow, dtype=pd.StringDtype("pyarrow", na_value=np.nan))
    except (ImportError, TypeError, ValueError):  # older pandas without the NaN-variant string dtype
        return np.full(n, value, dtype=object)
