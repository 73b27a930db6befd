// The component's entry point: gpulet's `power` world (wit/v0.1.2) bound to the policy
// in policy.js. componentize-js evaluates this module once at build time (Wizer) and
// snapshots the result, so nothing here runs again when the agent instantiates it.
//
// How the WIT maps to JavaScript with componentize-js (see README.md):
// - an export of the world is an exported function, camelCase: `validate-config` is
//   `validateConfig`, `decide-power` is `decidePower`;
// - an imported interface is an ES module named by its WIT id, version included;
// - result<T, E>: return T for ok; throw for err. The err value is the thrown value's
//   own `payload` property when it has one, else the thrown value itself, except that
//   an Error without `payload` becomes an empty err (for validate-config: an empty
//   list, which gpulet shows as "invalid config: " and nothing else);
// - records are objects with camelCase fields, option<T> is T or undefined, u64 is a
//   BigInt, an enum is its case as a string ('info'), flags are an object of booleans.

import { log } from 'gpulet:policy/host@0.1.2';
import { API_VERSION, VERSION, decide, parseConfig } from './policy.js';

/** The config `init` was given. An instance is re-made (and `init` called again) after
 * a fault or a config change, so nothing else needs keeping. */
let config = null;

/** An err for a result<_, E>: componentize-js takes `payload` as the E. */
function err(payload) {
  return { payload };
}

/**
 * Run an export; a JS exception that is not an err (a bug: an Error) is logged through
 * the host, with its stack, and rethrown: from decide-power that traps, from
 * validate-config or init it becomes an empty err. The component is built without
 * stdio, and gpulet sends a plugin's stderr nowhere anyway: this log line is the only
 * place the error's message shows (the agent reports a trap as a bare `unreachable`).
 */
function guarded(name, f) {
  try {
    return f();
  } catch (e) {
    if (e instanceof Error) {
      log('error', `${name}: ${e}${e.stack ? `\n${e.stack}` : ''}`);
    }
    throw e;
  }
}

export function info() {
  return { name: 'js-idle-saver', version: VERSION, apiVersion: API_VERSION };
}

export function validateConfig(json) {
  guarded('validate-config', () => {
    const parsed = parseConfig(json);
    if (!parsed.ok) throw err(parsed.errors);
  });
}

export function init(json, gpus) {
  guarded('init', () => {
    const parsed = parseConfig(json);
    if (!parsed.ok) {
      const e = parsed.errors[0];
      throw err(`${e.path}: ${e.message}`);
    }
    config = parsed.config;
    const c = parsed.config;
    const idle = c.idle_limit_w === undefined ? 'its lowest limit' : `${c.idle_limit_w} W`;
    log('info', `started on ${gpus.length} GPUs: under ${c.idle_util_pct} % a GPU gets ${idle}`);
  });
}

export function decidePower(snapshot) {
  return guarded('decide-power', () => (config === null ? [] : decide(config, snapshot)));
}
