"""Generated text streams: sentiment-like classification tasks over one shared vocabulary.

No corpus is downloaded or installed: a seeded generator writes every sequence. A *family*
(``sentiment_family(seed, num_tasks)``) fixes which token ids play which role and each task's
polarity lexicon; ``sentiment_stream`` draws the tasks' train and test sequences from it.

Vocabulary (``PAD`` = 0, the other ids assigned to roles by a seeded permutation):

- fillers (``FILLERS`` ids) and the modifiers, shared by every task: ``NEGATORS`` ("not")
  flip the polarity of the sentiment word right after them, ``INTENSIFIERS`` ("very")
  double its weight;
- a shared sentiment lexicon (``SHARED_WORDS`` ids, half positive, half negative): the same
  polarity in every task;
- contested words (``CONTESTED_WORDS`` ids): a polarity per task, the base polarity in
  task 0 and, in each later task, the base flipped on a random half of them;
- per task, its own topic words (``TOPIC_WORDS`` ids, no polarity: they mark the domain)
  and its own domain lexicon (``DOMAIN_WORDS`` ids, half positive, half negative), used by
  no other task.

A sequence of task t is built slot by slot up to a length drawn uniformly from ``MIN_LENGTH``
to ``SEQ_LEN`` tokens (slots are added while they fit; right-padded with ``PAD`` to
``SEQ_LEN``): a filler (probability ``P_FILLER``), one of the task's topic words
(``P_TOPIC``) or a sentiment phrase (the rest).
A phrase is a sentiment word (shared, domain or contested lexicon with probabilities
``P_LEXICON``), preceded by a negator with probability ``P_NEGATE`` or an intensifier
with probability ``P_INTENSIFY``. Its score is the sum over sentiment words of polarity_t(w),
times -1 after a negator and 2 after an intensifier; the label is positive when the score is
above 0. Sequences scoring exactly 0 are redrawn, and each split has as many positive as
negative sequences. Task t's labels are 2t (negative) and 2t + 1 (positive): under
task-incremental evaluation a task is a binary problem, under class-incremental one shared
head tells all 2T labels apart (the topic words say which task a sequence is from).

What the tasks share: the fillers, the grammar of the modifiers and the shared lexicon (a
rule that knows only those labels every task well above chance: transfer); what sets them
apart: the domain lexicons and the contested words, whose polarity flips between tasks
(interference: forgetting). Every draw comes from numpy generators seeded by the family
seed (the roles and lexicons) and by (seed, task) (that task's sequences), so a seed gives
the same stream on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .streams import Stream, Task

PAD = 0
SEQ_LEN = 24
MIN_LENGTH = 8
FILLERS = 40
NEGATORS = 3
INTENSIFIERS = 3
SHARED_WORDS = 24
CONTESTED_WORDS = 16
TOPIC_WORDS = 12
DOMAIN_WORDS = 12
P_FILLER = 0.4
P_TOPIC = 0.3
#: Probabilities of a phrase's sentiment word coming from the shared, domain, contested lexicon.
P_LEXICON = (0.5, 0.3, 0.2)
P_NEGATE = 0.1
P_INTENSIFY = 0.1
#: Default sizes of the ``synthetic-sentiment`` benchmark.
NUM_TASKS = 5
TRAIN_PER_TASK = 2000
TEST_PER_TASK = 500


@dataclass(frozen=True)
class SentimentFamily:
    """The roles of the token ids and every task's polarity lexicon (see the module doc).

    ``polarity[t, w]`` is +1, -1 or 0 (no polarity) for token w in task t; ``topics[t]``
    and ``domains[t]`` are task t's own topic and lexicon ids.
    """

    seed: int
    vocab_size: int
    fillers: np.ndarray
    negators: np.ndarray
    intensifiers: np.ndarray
    shared: np.ndarray
    contested: np.ndarray
    topics: tuple[np.ndarray, ...]
    domains: tuple[np.ndarray, ...]
    polarity: np.ndarray

    def scores(self, tokens: np.ndarray, task: int, polarity: np.ndarray | None = None
               ) -> np.ndarray:
        """Sentiment score of each row of ``tokens`` (N, L) under task ``task``'s lexicon.

        ``polarity`` (a vocabulary-sized vector) replaces the task's lexicon, e.g. to score
        with only the shared words.
        """
        weights = (self.polarity[task] if polarity is None else polarity)[tokens].astype(np.int64)
        before = np.pad(tokens[:, :-1], ((0, 0), (1, 0)), constant_values=PAD)
        weights[np.isin(before, self.negators)] *= -1
        weights[np.isin(before, self.intensifiers)] *= 2
        return weights.sum(axis=1)

    def sample(self, task: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` sequences of task ``task`` as (count, SEQ_LEN) ids, PAD after each length.

        Vectorised over sequences and slots: slot k of a row is a filler, a topic word or a
        phrase of one or two tokens; slots are kept while they fit in the row's drawn length.
        """
        shape = (count, SEQ_LEN)
        kind = np.digitize(rng.random(shape), [P_FILLER, P_FILLER + P_TOPIC])
        lexicon = rng.choice(3, size=shape, p=P_LEXICON)
        pools = (self.shared, self.domains[task], self.contested)
        sentiment = np.select([lexicon == i for i in range(3)],
                              [pool[rng.integers(len(pool), size=shape)] for pool in pools])
        word = np.select([kind == 0, kind == 1],
                         [self.fillers[rng.integers(FILLERS, size=shape)],
                          self.topics[task][rng.integers(TOPIC_WORDS, size=shape)]], sentiment)
        modifier = np.digitize(rng.random(shape), [P_NEGATE, P_NEGATE + P_INTENSIFY])
        modifier[kind != 2] = 2
        modifier_id = np.where(modifier == 0, self.negators[rng.integers(NEGATORS, size=shape)],
                               self.intensifiers[rng.integers(INTENSIFIERS, size=shape)])
        width = 1 + (modifier < 2)
        end = np.cumsum(width, axis=1)
        length = rng.integers(MIN_LENGTH, SEQ_LEN + 1, size=(count, 1))
        fits = end <= length
        tokens = np.full(shape, PAD, dtype=np.int64)
        rows = np.broadcast_to(np.arange(count)[:, None], shape)
        two = fits & (width == 2)
        tokens[rows[two], (end - 2)[two]] = modifier_id[two]
        tokens[rows[fits], (end - 1)[fits]] = word[fits]
        return tokens

    def split(self, task: int, count: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
        """``count`` sequences of task ``task`` (even), half negative and half positive in
        random order, none scoring 0; their labels are 2 * task + (score > 0)."""
        if not (isinstance(count, int) and count >= 2 and count % 2 == 0):
            raise ValueError(f"count: expected an even number of sequences >= 2, got {count!r}")
        kept: dict[bool, list[np.ndarray]] = {False: [], True: []}
        have = {False: 0, True: 0}
        while min(have.values()) < count // 2:
            tokens = self.sample(task, count + 64, rng)
            scores = self.scores(tokens, task)
            for positive in (False, True):
                rows = tokens[scores > 0 if positive else scores < 0][:count // 2 - have[positive]]
                kept[positive].append(rows)
                have[positive] += len(rows)
        tokens = np.concatenate(kept[False] + kept[True])
        labels = np.repeat(np.array([2 * task, 2 * task + 1], dtype=np.int64), count // 2)
        order = rng.permutation(count)
        return tokens[order], labels[order]


def sentiment_family(seed: int, num_tasks: int = NUM_TASKS) -> SentimentFamily:
    """The token roles and per-task lexicons of family ``seed`` (see the module doc)."""
    if not (isinstance(num_tasks, int) and not isinstance(num_tasks, bool) and num_tasks >= 1):
        raise ValueError(f"num_tasks: expected a positive integer, got {num_tasks!r}")
    rng = np.random.default_rng(seed)
    sizes = [FILLERS, NEGATORS, INTENSIFIERS, SHARED_WORDS, CONTESTED_WORDS,
             *[TOPIC_WORDS] * num_tasks, *[DOMAIN_WORDS] * num_tasks]
    vocab_size = 1 + sum(sizes)
    ids = rng.permutation(np.arange(1, vocab_size))
    groups = np.split(ids, np.cumsum(sizes)[:-1])
    fillers, negators, intensifiers, shared, contested = groups[:5]
    topics = tuple(groups[5:5 + num_tasks])
    domains = tuple(groups[5 + num_tasks:])
    polarity = np.zeros((num_tasks, vocab_size), dtype=np.int8)
    polarity[:, shared] = np.where(np.arange(SHARED_WORDS) % 2 == 0, 1, -1)
    base = rng.permutation(np.where(np.arange(CONTESTED_WORDS) % 2 == 0, 1, -1))
    for t in range(num_tasks):
        flips = np.ones(CONTESTED_WORDS, dtype=np.int8)
        if t > 0:
            flips[rng.permutation(CONTESTED_WORDS)[:CONTESTED_WORDS // 2]] = -1
        polarity[t, contested] = base * flips
        polarity[t, domains[t]] = np.where(np.arange(DOMAIN_WORDS) % 2 == 0, 1, -1)
    return SentimentFamily(seed, vocab_size, fillers, negators, intensifiers, shared,
                           contested, topics, domains, polarity)


@lru_cache(maxsize=4)
def _sentiment_arrays(seed: int, num_tasks: int, train: int, test: int):
    family = sentiment_family(seed, num_tasks)
    splits = []
    for t in range(num_tasks):
        rng = np.random.default_rng([seed, 1, t])
        splits.append((*family.split(t, train, rng), *family.split(t, test, rng)))
    return family, splits


def sentiment_stream(seed: int, num_tasks: int = NUM_TASKS, train_per_task: int = TRAIN_PER_TASK,
                     test_per_task: int = TEST_PER_TASK) -> Stream:
    """The generated family ``seed`` as a stream of ``num_tasks`` binary tasks (cached).

    Inputs are int64 token ids of shape (N, SEQ_LEN), PAD-padded on the right; task t has
    labels 2t and 2t + 1, ``train_per_task`` training and ``test_per_task`` test sequences
    (even numbers, balanced).
    """
    for name, value in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 2
                and value % 2 == 0):
            raise ValueError(f"{name}: expected an even integer >= 2, got {value!r}")
    family, splits = _sentiment_arrays(seed, num_tasks, train_per_task, test_per_task)
    tasks = tuple(
        Task(f"domain {t}", (2 * t, 2 * t + 1), torch.tensor(x_train), torch.tensor(y_train),
             torch.tensor(x_test), torch.tensor(y_test))
        for t, (x_train, y_train, x_test, y_test) in enumerate(splits))
    return Stream("synthetic-sentiment", tasks, 2 * num_tasks, vocab_size=family.vocab_size)
