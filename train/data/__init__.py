"""Training data: import teleoperation datasets as episodes, and relabel episodes into language.

The VLM2VLA recipe trains one VLM on a hierarchical language dataset made from demonstrations: per
episode the subtask list, and per step a motion plan and an action chunk written as text. This
package makes that dataset:

- `importers`: BridgeData v2 raw, LeRobot parquet datasets and our own episodes -> episode folders
  (runtime/EPISODE_FORMAT.md);
- `trajectory` (a demonstration as arrays), `segment` (cuts at gripper events and turns), `wording`
  (motion plans in words, and their check against the motion), `instruction` (objects and destinations
  of an instruction, in any language of the task suite), `subtasks` (subtask names per segment),
  `chunks` (action-chunk windows and their plans, waypoint windows);
- `local_annotator`: the deterministic annotator and the shared relabelling loop (`relabel`);
- `gemini_annotator`: Gemini words subtasks and plans; validated, cached, falls back to local labels;
- `dataset`: the labelled dataset's writer and reader (`write_dataset`, `read_dataset`);
  `dataset_append` grows an existing dataset atomically (a complete copy swapped in);
- `dagger`: the data flywheel: the states a recorded policy visited, labelled with the simulator expert's
  correction (the world rebuilt from the episode), or teleoperated corrections with the local annotator;
- `lerobot_export`: episodes -> a LeRobot v3.0 dataset (parquet, camera videos, `vlm2vla.*` columns);
  `lerobot_layout` (v2.x/v3 paths, shared with the importer) and `video` (PyAV decode and encode);
- `cli`: `vlm2vla-edge data import | export | relabel | dagger | eval | stats`.

Labelled dataset format (version 1)
===================================

A folder, written by `dataset.DatasetWriter` and read by `dataset.read_dataset` (which refuses an
unfinished, edited or newer dataset)::

    dataset.json        DatasetInfo, written last (atomically): its presence means the dataset is complete
    samples.jsonl       one Sample per line (UTF-8 JSON)
    images/<episode>/<frame>.jpg    key frames copied from the episodes

dataset.json fields: `format_version` (1); `created` (UTC, ISO 8601); `annotator` ("local" or
"gemini:MODEL"); `action_language` (`ActionLanguage.model_dump()`: decimals, gripper values,
post-processing thresholds the targets were written with); `sources` (per episode: `episode`,
`path`, `content_hash` = `episode_content_hash` (sha256 of meta.json, steps.jsonl and frames),
`annotator` of that episode, `samples`, `fallbacks` = cloud labels replaced by local ones, one
sentence each); `counts` (samples per stage); `samples_sha256` (sha256 of samples.jsonl: the
dataset's content hash); `skipped` (episodes not labelled, with why); `settings` (segmentation,
wording and chunk-limit rules used).

One sample (every key is always present; null where it does not apply)::

    {"id": "sim-0000004/000013/action",   unique: "<episode>/<step:06d>/<stage>"
     "episode": "sim-0000004",            source episode id
     "step": 13,                          steps.jsonl index the sample is taken at (the key frame's step)
     "stage": "action",                   "subtasks" | "motion" | "action" | "aux"
     "instruction": "把茄子放进平底锅里，然后举起鱼",   the task as given to the robot (any language)
     "subtask": "Move to the pan",        current subtask (motion, action); null otherwise
     "subtask_index": 3,                  its index in `subtasks` (motion, action); null otherwise
     "subtasks": ["Move to the eggplant", ...],   the episode's subtask list (subtasks, motion, action)
     "motion_plan": "Move primarily ...", the plan given as INPUT to the action stage; null otherwise
     "target": "[[-0.014, -0.046, 0, 0], ...]",   the answer the model must produce
     "image": "images/sim-0000004/000013.jpg",    key frame, relative to the dataset folder, or null
     "scene": "gripper at x=... cm, ..."}         text observation for text-only models, or null

Per stage, the prompt is built with `runtime.policy.prompts.PromptTemplates` and the answer is `target`:

=========  ==========================================  ===================================================
stage      prompt inputs                               target
=========  ==========================================  ===================================================
subtasks   image/scene, instruction                    `format_subtasks(subtasks)`
motion     image/scene, instruction, subtask           one motion-plan line (`wording.motion_plan_text`)
action     image/scene, instruction, subtask,          `format_action_chunk(chunk)`: the recorded deltas of
           motion_plan                                 the window, re-aggregated, within the robot limits
aux        `instruction` only: a self-contained        a direction phrase ("Move primarily down and
           question naming a displacement in cm        slightly to the right"); no image, no subtask
=========  ==========================================  ===================================================

Every target parses with `runtime.parser` (`parse_subtasks`, `parse_motion_plan`,
`parse_action_chunk` with the dataset's action language); the tests check it. Chaining the action
targets of an episode from its first position reproduces the recorded end-effector path within the
re-aggregation thresholds (2.5 cm per axis) and ends each chunk where the recording does (to the
rounding of the last decimal).
"""

from vlm2vla_edge.train.data.dataset import (
    DatasetFormatError,
    DatasetInfo,
    DatasetWriter,
    LabelledDataset,
    Sample,
    SourceEpisode,
    episode_content_hash,
    read_dataset,
    samples_hash,
    write_dataset,
)

__all__ = [
    "DatasetFormatError", "DatasetInfo", "DatasetWriter", "LabelledDataset", "Sample", "SourceEpisode",
    "episode_content_hash", "read_dataset", "samples_hash", "write_dataset",
]
