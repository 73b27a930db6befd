// The policy, natively: `npm test` (node --test), no Wasm and no build needed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { API_VERSION, VERSION, decide, parseConfig } from './policy.js';

/** A GPU as componentize-js hands it to decidePower (WIT `gpu`, camelCase fields). */
function gpu(index, utilPct) {
  return {
    index,
    powerW: 300,
    powerLimitW: 700,
    energyJ: undefined,
    tempC: 60,
    utilPct,
    memUsedMib: undefined,
    smClockMhz: undefined,
    throttle: { gpuIdle: false, swPowerCap: false, hwSlowdown: false, swThermal: false, hwThermal: false, hwPowerBrake: false },
    health: 'ok',
    minLimitW: 200,
    maxLimitW: 700,
    defaultLimitW: 700,
    proposedLimitW: undefined,
  };
}

function snapshot(gpus) {
  return { seq: 1n, nowMs: 0n, budgetW: undefined, gpus };
}

function config(json) {
  const parsed = parseConfig(json);
  assert.ok(parsed.ok, JSON.stringify(parsed.errors));
  return parsed.config;
}

test('idle GPUs are parked and busy ones get their highest limit', () => {
  const actions = decide(config('{}'), snapshot([gpu(0, 1), gpu(1, 90)]));
  assert.deepEqual(
    actions.map((a) => [a.gpu, a.limitW]),
    [[0, 200], [1, 700]],
  );
  assert.match(actions[0].reason, /^idle \(1 % < 5 %\): parked at 200 W$/);
  assert.match(actions[1].reason, /^busy \(90 %\)/);
});

test('a GPU without a utilisation reading gets no action', () => {
  const actions = decide(config('{}'), snapshot([gpu(0, undefined), gpu(1, 0)]));
  assert.deepEqual(actions.map((a) => a.gpu), [1]);
});

test('idle_limit_w is used, clamped into the GPU bounds', () => {
  assert.equal(decide(config('{"idle_limit_w": 250}'), snapshot([gpu(0, 0)]))[0].limitW, 250);
  assert.equal(decide(config('{"idle_limit_w": 100}'), snapshot([gpu(0, 0)]))[0].limitW, 200);
  assert.equal(decide(config('{"idle_limit_w": 900}'), snapshot([gpu(0, 0)]))[0].limitW, 700);
});

test('idle_util_pct sets the threshold (strictly below is idle)', () => {
  const c = config('{"idle_util_pct": 50}');
  assert.deepEqual(
    decide(c, snapshot([gpu(0, 49.5), gpu(1, 50)])).map((a) => a.limitW),
    [200, 700],
  );
});

test('an empty config is the defaults', () => {
  assert.deepEqual(config(''), { idle_util_pct: 5, idle_limit_w: undefined });
  assert.deepEqual(config('  '), { idle_util_pct: 5, idle_limit_w: undefined });
  assert.deepEqual(config('{"idle_limit_w": null}'), { idle_util_pct: 5, idle_limit_w: undefined });
});

test('a bad config names its path and what is accepted', () => {
  const errors = (json) => {
    const parsed = parseConfig(json);
    assert.equal(parsed.ok, false);
    return parsed.errors;
  };
  const [range] = errors('{"idle_util_pct": 200}');
  assert.equal(range.path, '$.idle_util_pct');
  assert.match(range.message, /out of range; accepted: 0 to 100/);

  const [unknown] = errors('{"idle": 1}');
  assert.equal(unknown.path, '$.idle');
  assert.match(unknown.message, /unknown key "idle"; accepted: idle_util_pct, idle_limit_w/);

  assert.equal(errors('{"idle_limit_w": 0}')[0].path, '$.idle_limit_w');
  assert.equal(errors('{"idle_limit_w": 1e999}')[0].path, '$.idle_limit_w'); // Infinity
  assert.match(errors('{"idle_util_pct": "5"}')[0].message, /expected a number/);
  assert.equal(errors('{"idle_util_pct": -1, "x": 1}').length, 2); // every problem
  assert.equal(errors('[]')[0].path, '$');
  assert.equal(errors('{')[0].path, '$');
});

test('the version in info() is package.json\'s, built against 0.1.2', () => {
  const pkg = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'));
  assert.equal(VERSION, pkg.version);
  assert.equal(API_VERSION, '0.1.2');
});
