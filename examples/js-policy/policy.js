// js-idle-saver: a gpulet power policy in JavaScript (the policy itself, no Wasm here).
//
// The same policy as gpulet's Rust template (`gpulet plugin new`): a GPU whose
// utilisation reading is below `idle_util_pct` gets `idle_limit_w` (or its lowest
// limit), a busy one its highest. A GPU without a utilisation reading (lost, or the
// reading failed this tick) gets no action, so the host gives it its upper bound (as to
// any GPU no policy proposes for): what a busy one gets.
//
// Config (JSON, all optional): {"idle_util_pct": 5, "idle_limit_w": 200}. It needs the
// grants "lower" and "raise".
//
// This module is plain JavaScript with no imports, so that `node --test` checks it
// without Wasm; component.js wires it to gpulet's WIT and host. The values it takes
// and returns have the shapes that componentize-js gives the WIT types (see README.md):
// records are objects with camelCase fields, option<T> is the value or undefined, u64 is
// a BigInt, an enum is its case name as a string.

/** The plugin's own version: keep it the same as package.json's (a test checks). */
export const VERSION = '0.1.0';

/** The contract it is built against (wit/v0.1.2, package gpulet:policy@0.1.2). */
export const API_VERSION = '0.1.2';

/** The config's keys, with their defaults (undefined: per GPU, its min-limit-w). */
const DEFAULTS = Object.freeze({ idle_util_pct: 5, idle_limit_w: undefined });

/**
 * Parse and check the config strictly: not an object, an unknown key, a wrong type or a
 * value out of range is an error naming its JSON path. Every problem is reported, not
 * only the first.
 *
 * @param {string} json the plugin's config as the agent gives it ("" counts as "{}")
 * @returns {{ok: true, config: {idle_util_pct: number, idle_limit_w: number|undefined}}
 *          | {ok: false, errors: {path: string, message: string}[]}}
 */
export function parseConfig(json) {
  const text = typeof json === 'string' && json.trim() !== '' ? json : '{}';
  let raw;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    return { ok: false, errors: [{ path: '$', message: `not JSON: ${e.message}` }] };
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    const what = raw === null ? 'null' : Array.isArray(raw) ? 'an array' : typeof raw;
    return { ok: false, errors: [{ path: '$', message: `expected an object, got ${what}` }] };
  }

  const errors = [];
  const config = { ...DEFAULTS };
  const accepted = Object.keys(DEFAULTS).join(', ');
  for (const [key, value] of Object.entries(raw)) {
    const path = `$.${key}`;
    if (!Object.hasOwn(DEFAULTS, key)) {
      errors.push({ path, message: `unknown key "${key}"; accepted: ${accepted}` });
      continue;
    }
    if (key === 'idle_limit_w' && value === null) continue; // null: the default
    // JSON.parse reads 1e999 as Infinity: refuse it with the numbers out of range.
    if (typeof value !== 'number') {
      errors.push({ path, message: `expected a number, got ${JSON.stringify(value)}` });
      continue;
    }
    if (key === 'idle_util_pct' && !(value >= 0 && value <= 100)) {
      errors.push({ path, message: `${value} is out of range; accepted: 0 to 100 (%)` });
      continue;
    }
    if (key === 'idle_limit_w' && !(value > 0 && Number.isFinite(value))) {
      errors.push({ path, message: `${value} is out of range; accepted: a positive number of watts` });
      continue;
    }
    config[key] = value;
  }
  return errors.length > 0 ? { ok: false, errors } : { ok: true, config: Object.freeze(config) };
}

/** A number for a person: whole numbers as such, others to one decimal. */
function num(x) {
  return Number.isInteger(x) ? String(x) : x.toFixed(1);
}

/**
 * The policy: a limit for every GPU with a utilisation reading.
 *
 * @param {{idle_util_pct: number, idle_limit_w: number|undefined}} config from parseConfig
 * @param {{gpus: {index: number, utilPct?: number, minLimitW: number, maxLimitW: number}[]}} snapshot
 * @returns {{gpu: number, limitW: number, reason: string}[]} power-action records
 */
export function decide(config, snapshot) {
  const actions = [];
  for (const g of snapshot.gpus) {
    const util = g.utilPct;
    if (util === undefined || util === null) continue;
    if (util < config.idle_util_pct) {
      const wanted = config.idle_limit_w ?? g.minLimitW;
      const w = Math.min(Math.max(wanted, g.minLimitW), g.maxLimitW);
      actions.push({
        gpu: g.index,
        limitW: w,
        reason: `idle (${num(util)} % < ${num(config.idle_util_pct)} %): parked at ${num(w)} W`,
      });
    } else {
      actions.push({
        gpu: g.index,
        limitW: g.maxLimitW,
        reason: `busy (${num(util)} %): its highest limit, ${num(g.maxLimitW)} W`,
      });
    }
  }
  return actions;
}
