"""Native tests of the policy: `python3 -m unittest` in this folder (no Wasm needed)."""

import unittest
from typing import NamedTuple, Optional

from app import Config, InvalidConfig, decide, parse_config


class Gpu(NamedTuple):
    index: int
    util_pct: Optional[float]
    min_limit_w: float = 200.0
    max_limit_w: float = 700.0


class PolicyTest(unittest.TestCase):
    def test_idle_gpus_are_parked_and_busy_ones_get_their_highest_limit(self):
        actions = decide(parse_config("{}"), [Gpu(0, 1.0), Gpu(1, 90.0)])
        self.assertEqual([(a.gpu, a.limit_w) for a in actions], [(0, 200.0), (1, 700.0)])
        self.assertEqual(actions[0].reason, "idle (1 % < 5 %): parked at 200 W")
        self.assertEqual(actions[1].reason, "busy (90 %): its highest limit")

    def test_a_gpu_without_a_reading_is_left_alone(self):
        self.assertEqual(decide(Config(), [Gpu(0, None)]), [])

    def test_idle_limit_is_used_and_clamped_to_the_gpus_bounds(self):
        c = parse_config('{"idle_limit_w": 300, "idle_util_pct": 10}')
        self.assertEqual(decide(c, [Gpu(0, 9.0)])[0].limit_w, 300.0)
        self.assertEqual(decide(c, [Gpu(0, 10.0)])[0].limit_w, 700.0)
        low = parse_config('{"idle_limit_w": 50}')
        self.assertEqual(decide(low, [Gpu(0, 0.0)])[0].limit_w, 200.0)

    def test_empty_config_is_the_defaults(self):
        self.assertEqual(parse_config(""), Config(5.0, None))
        self.assertEqual(parse_config('{"idle_limit_w": null}'), Config(5.0, None))


class ConfigTest(unittest.TestCase):
    def problems(self, text):
        with self.assertRaises(InvalidConfig) as ctx:
            parse_config(text)
        return [(p.path, p.message) for p in ctx.exception.problems]

    def test_unknown_key_names_its_path(self):
        [(path, message)] = self.problems('{"idle": 1}')
        self.assertEqual(path, "$.idle")
        self.assertIn("unknown key", message)

    def test_out_of_range_names_the_range(self):
        [(path, message)] = self.problems('{"idle_util_pct": 200}')
        self.assertEqual(path, "$.idle_util_pct")
        self.assertIn("0 to 100", message)

    def test_wrong_types_and_non_json(self):
        self.assertEqual(self.problems('{"idle_util_pct": true}')[0][0], "$.idle_util_pct")
        self.assertEqual(self.problems('{"idle_limit_w": -1}')[0][0], "$.idle_limit_w")
        self.assertEqual(self.problems('{"idle_limit_w": "200"}')[0][0], "$.idle_limit_w")
        self.assertEqual(self.problems('{"idle_limit_w": NaN}')[0][0], "$")
        self.assertEqual(self.problems('{"idle_util_pct": 1, "idle_util_pct": 2}')[0][0], "$")
        self.assertEqual(self.problems("[1]")[0][0], "$")
        self.assertEqual(self.problems("{")[0][0], "$")

    def test_every_problem_is_reported(self):
        paths = [p for p, _ in self.problems('{"a": 1, "idle_util_pct": -1}')]
        self.assertEqual(paths, ["$.a", "$.idle_util_pct"])


if __name__ == "__main__":
    unittest.main()
