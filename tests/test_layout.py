"""Latent layouts and the frame masks of every sample kind (method sheet 1.3)."""

from __future__ import annotations

import pytest

from cosmos_policy.errors import ConfigError
from cosmos_policy.layout import FrameRole, SampleKind, SlotTime, layout_from_dict, load_layout

C, G, M = FrameRole.CLEAN, FrameRole.GENERATED, FrameRole.MASKED

# The method sheet's LIBERO table, column by column (frames 0..8).
LIBERO_ROLES = {
    SampleKind.POLICY: [C, C, C, C, G, G, G, G, G],
    SampleKind.WORLD_MODEL: [C, C, C, C, C, G, G, G, G],
    SampleKind.VALUE: [C, C, C, C, C, C, C, C, G],
    SampleKind.VALUE_SPRIME: [C, M, M, M, M, C, C, C, G],
    # Q(s, a): future state masked, value from current state and action.
    SampleKind.Q_VALUE: [C, C, C, C, C, M, M, M, G],
}
# "policy = frames 0..4 clean; world model = 0..5 clean; value = 0..9 clean;
#  V(s') planning value = {0, 6..9} clean, {1..5} masked" for the 11-frame layouts.
ELEVEN_ROLES = {
    SampleKind.POLICY: [C] * 5 + [G] * 6,
    SampleKind.WORLD_MODEL: [C] * 6 + [G] * 5,
    SampleKind.VALUE: [C] * 10 + [G],
    SampleKind.VALUE_SPRIME: [C] + [M] * 5 + [C] * 4 + [G],
    SampleKind.Q_VALUE: [C] * 6 + [M] * 4 + [G],
}


def test_libero_layout_indices(libero):
    assert libero.num_frames == 9 and libero.num_pixel_frames == 33
    assert [s.name for s in libero.slots] == [
        "blank", "current_proprio", "current_image.wrist", "current_image.primary", "action",
        "future_proprio", "future_image.wrist", "future_image.primary", "value",
    ]
    assert libero.action_index == 4 and libero.value_index == 8
    assert libero.proprio_index(SlotTime.CURRENT) == 1 and libero.proprio_index("future") == 5
    assert libero.image_indices("future") == [6, 7]
    assert libero.injected_indices() == [0, 1, 4, 5, 8]
    assert (libero.action_chunk, libero.action_dim, libero.proprio_dim) == (16, 7, 9)


@pytest.mark.parametrize("kind", list(SampleKind))
def test_libero_masks_match_the_method_table(libero, kind):
    assert list(libero.frame_roles(kind)) == LIBERO_ROLES[kind]


@pytest.mark.parametrize("name", ["robocasa", "aloha"])
@pytest.mark.parametrize("kind", list(SampleKind))
def test_eleven_frame_masks_match_the_method_table(name, kind):
    layout = load_layout(name)
    assert layout.num_frames == 11 and layout.num_pixel_frames == 41
    assert list(layout.frame_roles(kind)) == ELEVEN_ROLES[kind]


def test_robocasa_and_aloha_slots(robocasa, aloha):
    assert robocasa.cameras == ("wrist", "primary", "secondary")
    assert (robocasa.action_chunk, robocasa.action_dim) == (32, 7)
    assert aloha.cameras == ("left_wrist", "right_wrist", "primary")
    assert (aloha.action_chunk, aloha.action_dim, aloha.proprio_dim) == (50, 14, 14)
    # undo_latent_injection indices of the official code: RoboCasa/ALOHA [0, 1, 5, 6] plus the value frame.
    assert robocasa.injected_indices() == [0, 1, 5, 6, 10]


def test_role_tensor_per_sample(libero):
    roles = libero.role_tensor([SampleKind.POLICY, "value_sprime"])
    assert roles.shape == (2, 9)
    assert roles[0].tolist() == [int(r) for r in LIBERO_ROLES[SampleKind.POLICY]]
    assert roles[1].tolist() == [int(r) for r in LIBERO_ROLES[SampleKind.VALUE_SPRIME]]


def test_clean_prefix_is_what_inference_encodes(libero, aloha):
    # Policy: blank, proprio, wrist, primary -> 4 latent frames = 13 pixel frames.
    assert libero.clean_prefix(SampleKind.POLICY) == 4
    assert libero.clean_prefix(SampleKind.WORLD_MODEL) == 4  # the action frame is injected, not encoded
    assert libero.clean_prefix(SampleKind.VALUE_SPRIME) == 8  # future images are clean
    assert aloha.clean_prefix(SampleKind.POLICY) == 5


def test_user_defined_layout_from_config(tmp_path):
    path = tmp_path / "two_cams.yaml"
    path.write_text(
        "name: my_robot\naction_chunk: 8\naction_dim: 6\nproprio_dim: 0\nslots:\n"
        "  - blank\n  - {kind: image, time: current, camera: front}\n  - action\n"
        "  - {kind: image, time: future, camera: front}\n  - value\n"
    )
    layout = load_layout(path)
    assert layout.num_frames == 5 and not layout.has_proprio
    assert layout.proprio_index("current") is None
    assert list(layout.frame_roles("world_model")) == [C, C, C, G, G]
    assert layout_from_dict(layout.to_dict()) == layout


BASE = {
    "name": "bad",
    "action_chunk": 4,
    "action_dim": 2,
    "proprio_dim": 0,
    "slots": ["blank", {"kind": "image", "time": "current", "camera": "a"}, "action", {"kind": "image", "time": "future", "camera": "a"}, "value"],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slots": ["action", {"kind": "image", "time": "current", "camera": "a"}, "blank", "value"]}, "slot 0 must be 'blank'"),
        ({"slots": BASE["slots"][:2] + ["action", "action"] + BASE["slots"][3:]}, "exactly one 'action'"),
        ({"slots": BASE["slots"][:3] + [{"kind": "image", "time": "future", "camera": "b"}, "value"]}, "must match current cameras"),
        ({"slots": ["blank", "action", {"kind": "image", "time": "current", "camera": "a"}, {"kind": "image", "time": "future", "camera": "a"}, "value"]}, "ordered"),
        ({"action_chunk": 0}, "action_chunk must be a positive integer"),
        ({"proprio_dim": 9}, "proprio_dim is 9 but proprio slots are absent"),
        ({"slots": BASE["slots"][:1] + [{"kind": "image", "time": "current"}] + BASE["slots"][2:]}, "needs a camera"),
        ({"slots": BASE["slots"][:1] + [{"kind": "picture", "time": "current", "camera": "a"}] + BASE["slots"][2:]}, "picture"),
    ],
)
def test_invalid_layouts_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        layout_from_dict({**BASE, **change})


def test_missing_layout_name_lists_known_ones():
    with pytest.raises(ConfigError, match="known: "):
        load_layout("no_such_robot")
