'use strict';
/**
 * A data-processing agent in JavaScript that runs as a child process of a nexus_trio kernel.
 *
 * Commands (or Queries), answered with {"result": ...}:
 *   {"operation": "transform", "data": [...], "map": "uppercase" | ["trim", "uppercase"]}
 *       maps: uppercase, lowercase, trim, reverse, length (strings); double, square, negate,
 *       increment, abs, round (numbers)
 *   {"operation": "filter", "data": [...], "predicate": {"op": "gt", "value": 10, "key": "age"}}
 *       ops: eq, ne, gt, gte, lt, lte, contains, startsWith, in; "key" is optional (objects)
 *   {"operation": "aggregate", "data": [{...}], "fn": "sum", "field": "amount", "by": "category"}
 *       fns: sum, avg, min, max, count; without "by" the result is one number
 *   {"operation": "stats", "data": [numbers], "field": "x" (optional, for objects)}
 *       -> {"result": {"count", "mean", "median", "stddev" (population), "min", "max"}}
 * Problems are answered with {"error": <text>, "code": <code>[, "field"][, "index"]}; codes:
 * invalid_payload, unknown_operation, invalid_data, unknown_map, type_mismatch,
 * invalid_predicate, unknown_predicate, unknown_function, missing_field, not_numeric,
 * empty_data. Events are ignored (answered with null).
 *
 * Run it under the kernel with `nexus run --spawn "node examples/javascript_agent_example.js"`.
 */

const path = require('path');
const { NexusAgent, runMain } = require(path.join(__dirname, '..', 'nexus_trio', 'bridges', 'nexus-bridge.js'));

/** A problem with the request: answered as an error payload, not a failed message. */
class DataError extends Error {
  constructor(code, text, extra = {}) {
    super(text);
    this.code = code;
    this.extra = extra;
  }

  payload() {
    return { error: this.message, code: this.code, ...this.extra };
  }
}

const describe = (value) => (Array.isArray(value) ? 'array' : value === null ? 'null' : typeof value);

const STRING_MAPS = {
  uppercase: (s) => s.toUpperCase(),
  lowercase: (s) => s.toLowerCase(),
  trim: (s) => s.trim(),
  reverse: (s) => Array.from(s).reverse().join(''),
  length: (s) => Array.from(s).length,
};

const NUMBER_MAPS = {
  double: (n) => n * 2,
  square: (n) => n * n,
  negate: (n) => -n,
  increment: (n) => n + 1,
  abs: (n) => Math.abs(n),
  round: (n) => Math.round(n),
};

function isNumber(value) {
  return typeof value === 'number' && Number.isFinite(value);
}

function requireData(payload) {
  const data = payload.data;
  if (!Array.isArray(data)) {
    throw new DataError('invalid_data', `'data' must be an array, got ${describe(data)}`, { field: 'data' });
  }
  return data;
}

function field(item, key, index) {
  if (key === undefined || key === null) return item;
  if (item === null || typeof item !== 'object' || !(key in item)) {
    throw new DataError('missing_field', `item ${index} has no field ${JSON.stringify(key)}`, { field: key, index });
  }
  return item[key];
}

function numberAt(item, key, index) {
  const value = field(item, key, index);
  if (!isNumber(value)) {
    const what = key === undefined || key === null ? 'item' : `field ${JSON.stringify(key)} of item`;
    throw new DataError('not_numeric', `${what} ${index} must be a number, got ${describe(value)}`, { index });
  }
  return value;
}

function transform(payload) {
  const data = requireData(payload);
  const names = Array.isArray(payload.map) ? payload.map : [payload.map];
  if (names.length === 0) {
    throw new DataError('unknown_map', "'map' must name at least one map", { field: 'map' });
  }
  const fns = names.map((name) => {
    if (typeof name === 'string' && Object.hasOwn(STRING_MAPS, name)) return [name, 'string', STRING_MAPS[name]];
    if (typeof name === 'string' && Object.hasOwn(NUMBER_MAPS, name)) return [name, 'number', NUMBER_MAPS[name]];
    const known = [...Object.keys(STRING_MAPS), ...Object.keys(NUMBER_MAPS)].join(', ');
    throw new DataError('unknown_map', `unknown map ${JSON.stringify(name)} (expected one of ${known})`, { field: 'map' });
  });
  return data.map((item, index) =>
    fns.reduce((value, [name, type, fn]) => {
      if (type === 'number' ? !isNumber(value) : typeof value !== 'string') {
        throw new DataError('type_mismatch', `map ${name} needs a ${type} at index ${index}, got ${describe(value)}`, { index });
      }
      return fn(value);
    }, item),
  );
}

const PREDICATES = {
  eq: (a, b) => a === b,
  ne: (a, b) => a !== b,
  gt: (a, b) => a > b,
  gte: (a, b) => a >= b,
  lt: (a, b) => a < b,
  lte: (a, b) => a <= b,
  contains: (a, b) => (typeof a === 'string' || Array.isArray(a)) && a.includes(b),
  startsWith: (a, b) => typeof a === 'string' && a.startsWith(b),
  in: (a, b) => b.includes(a),
};
const ORDERED = new Set(['gt', 'gte', 'lt', 'lte']);

function filter(payload) {
  const data = requireData(payload);
  const predicate = payload.predicate;
  if (predicate === null || typeof predicate !== 'object' || Array.isArray(predicate)) {
    throw new DataError('invalid_predicate', `'predicate' must be an object like {"op": "gt", "value": 1}, got ${describe(predicate)}`, { field: 'predicate' });
  }
  const { op, value, key } = predicate;
  if (typeof op !== 'string' || !Object.hasOwn(PREDICATES, op)) {
    throw new DataError('unknown_predicate', `unknown predicate op ${JSON.stringify(op)} (expected one of ${Object.keys(PREDICATES).join(', ')})`, { field: 'predicate.op' });
  }
  if (!('value' in predicate)) {
    throw new DataError('invalid_predicate', "'predicate' needs a 'value'", { field: 'predicate.value' });
  }
  if (op === 'in' && !Array.isArray(value)) {
    throw new DataError('invalid_predicate', "predicate op 'in' needs an array 'value'", { field: 'predicate.value' });
  }
  const test = PREDICATES[op];
  return data.filter((item, index) => {
    const actual = field(item, key, index);
    if (ORDERED.has(op) && typeof actual !== typeof value) {
      throw new DataError('type_mismatch', `predicate ${op} compares ${typeof value} with ${describe(actual)} at index ${index}`, { index });
    }
    return test(actual, value);
  });
}

const AGGREGATES = {
  sum: (xs) => xs.reduce((a, b) => a + b, 0),
  avg: (xs) => xs.reduce((a, b) => a + b, 0) / xs.length,
  min: (xs) => xs.reduce((a, b) => Math.min(a, b)),
  max: (xs) => xs.reduce((a, b) => Math.max(a, b)),
  count: (xs) => xs.length,
};

function aggregate(payload) {
  const data = requireData(payload);
  const fn = payload.fn;
  if (typeof fn !== 'string' || !Object.hasOwn(AGGREGATES, fn)) {
    throw new DataError('unknown_function', `unknown aggregate fn ${JSON.stringify(fn)} (expected one of ${Object.keys(AGGREGATES).join(', ')})`, { field: 'fn' });
  }
  const needsValues = fn !== 'count';
  if (needsValues && payload.field !== undefined && typeof payload.field !== 'string') {
    throw new DataError('missing_field', "'field' must be a string", { field: 'field' });
  }
  const groups = new Map();
  data.forEach((item, index) => {
    const group = payload.by === undefined ? null : String(field(item, payload.by, index));
    const value = needsValues ? numberAt(item, payload.field, index) : 1;
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(value);
  });
  const reduce = (values) => {
    if (values.length === 0 && fn !== 'count' && fn !== 'sum') {
      throw new DataError('empty_data', `${fn} of no values is undefined`, { field: 'data' });
    }
    return AGGREGATES[fn](values);
  };
  if (payload.by === undefined) return reduce(groups.get(null) || []);
  const result = {};
  for (const [group, values] of groups) result[group] = reduce(values);
  return result;
}

function stats(payload) {
  const data = requireData(payload);
  if (data.length === 0) {
    throw new DataError('empty_data', 'stats of no values is undefined', { field: 'data' });
  }
  const xs = data.map((item, index) => numberAt(item, payload.field, index));
  const sorted = [...xs].sort((a, b) => a - b);
  const n = xs.length;
  const mean = xs.reduce((a, b) => a + b, 0) / n;
  const middle = Math.floor(n / 2);
  const median = n % 2 === 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
  const variance = xs.reduce((acc, x) => acc + (x - mean) ** 2, 0) / n;
  return { count: n, mean, median, stddev: Math.sqrt(variance), min: sorted[0], max: sorted[n - 1] };
}

const OPERATIONS = { transform, filter, aggregate, stats };

class DataProcessorAgent extends NexusAgent {
  onStart() {
    this.processed = 0;
    this.log(`data processor ${this.name} ready (protocol ${this.protocol})`);
  }

  // async: the bridge awaits a Promise before answering (a real agent might fetch data here).
  async handleMessage(message) {
    if (message.kind !== 'Command' && message.kind !== 'Query') return null;
    const payload = message.payload;
    try {
      if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
        throw new DataError('invalid_payload', `payload must be an object, got ${describe(payload)}`);
      }
      const operation = payload.operation;
      if (typeof operation !== 'string' || !Object.hasOwn(OPERATIONS, operation)) {
        throw new DataError('unknown_operation', `unknown operation ${JSON.stringify(operation)} (expected one of ${Object.keys(OPERATIONS).join(', ')})`, { field: 'operation' });
      }
      const result = OPERATIONS[operation](payload);
      this.processed += 1;
      return { result };
    } catch (err) {
      if (err instanceof DataError) return err.payload();
      throw err;
    }
  }

  onStop() {
    this.log(`data processor ${this.name} stopping after ${this.processed} requests`);
  }
}
DataProcessorAgent.defaultName = 'data-processor';

module.exports = { DataProcessorAgent, transform, filter, aggregate, stats };

if (require.main === module) {
  runMain(DataProcessorAgent);
}
