'use strict';
/**
 * The agent side of the Nexus stdio bridge for Node.js (18+, no dependencies, CommonJS).
 *
 * Subclass NexusAgent, override handleMessage(message) (may be async) and optionally
 * onStart() / onStop(), then call agent.runAgent() (or runAgent(agent), the original Nexus
 * spelling; `new MyAgent('name')` works as in the original too). The bridge speaks newline-delimited JSON with
 * the kernel over stdin/stdout: it sends `register`, answers every `message` with exactly one
 * `response` (or `error`) frame, one message at a time, answers `ping` with `pong`, and exits
 * after a `shutdown` frame or at the end of input. In protocol 2 it declares the `cancel`
 * feature: input is read while a handler runs, and a `cancel` frame for the message being
 * handled aborts `this.signal` (and sets `this.cancelled`). Stdout carries nothing but frames: while
 * the agent runs, console.log() and process.stdout.write() go to stderr.
 * The wire format is described in docs/protocol.md. `node nexus-bridge.js` runs an echo agent
 * (`--help` for its options, the same as the Python bridge's).
 */

const crypto = require('crypto');

const PROTOCOL_VERSION = 2;
/** Optional protocol-2 extensions declared in `register` (`features`). */
const FEATURES = Object.freeze(['cancel']);
/** Cancel frames remembered for messages not (yet) being handled. */
const EARLY_CANCELS = 64;
/**
 * Protocol 2: bytes of input read ahead of the line being handled, at most (then reading
 * waits, and so does the kernel's next write: backpressure).
 */
const READ_AHEAD = 1 << 20;
const KINDS = ['Command', 'Event', 'Query', 'Response'];
const MESSAGE_FIELDS = ['from', 'to', 'kind', 'payload'];
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const SNIPPET = 60;
// characters (UTF-16 units) of an error's text written in an `error` frame (or a
// protocol-1 error response); the rest is cut, and the cut said. The kernel keeps 4,096
// of them; a frame this long stays under its 1 MiB line limit.
const ERROR_TEXT_LIMIT = 16384;
// `text` (an error's, or its name) cut at ERROR_TEXT_LIMIT, the cut said; not between the
// two halves of a surrogate pair: a lone one is refused by the kernel
function cutErrorText(text) {
  if (text.length <= ERROR_TEXT_LIMIT) return text;
  let end = ERROR_TEXT_LIMIT;
  const last = text.charCodeAt(end - 1);
  if (last >= 0xd800 && last <= 0xdbff) end -= 1;
  return `${text.slice(0, end)}... (${(text.length - end).toLocaleString('en-US')} characters cut)`;
}
// what a line after a UTF-8 byte order mark is, in the Python bridge's words
const BOM_PROBLEM = 'Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)';

/**
 * Why `raw` (a line that is not UTF-8) is not, in the words of Python's decoder as the Python
 * bridge reports it: "invalid start byte at byte 3". Offsets count in the line less its
 * line ending (the Python bridge decodes the line without it).
 */
function utf8Problem(raw) {
  let end = raw.length;
  while (end > 0 && (raw[end - 1] === 0x0a || raw[end - 1] === 0x0d)) end -= 1;
  let i = 0;
  while (i < end) {
    const lead = raw[i];
    let size = 1;
    let low = 0x80;
    let high = 0xbf;
    if (lead >= 0xc2 && lead <= 0xdf) size = 2;
    else if (lead >= 0xe0 && lead <= 0xef) {
      size = 3;
      if (lead === 0xe0) low = 0xa0;
      if (lead === 0xed) high = 0x9f;
    } else if (lead >= 0xf0 && lead <= 0xf4) {
      size = 4;
      if (lead === 0xf0) low = 0x90;
      if (lead === 0xf4) high = 0x8f;
    } else if (lead >= 0x80) return `invalid start byte at byte ${i}`;
    for (let k = 1; k < size; k += 1) {
      if (i + k >= end) return `unexpected end of data at byte ${i}`;
      const next = raw[i + k];
      if (next < (k === 1 ? low : 0x80) || next > (k === 1 ? high : 0xbf)) {
        return `invalid continuation byte at byte ${i}`;
      }
    }
    i += size;
  }
  return 'invalid byte';
}

/**
 * The strict reader of input lines: bytes that are not UTF-8 throw, and a byte order mark
 * stays in the text (by default the decoder drops it; frames are UTF-8 without one, and
 * _parse refuses it as the Python bridge does).
 */
function lineDecoder() {
  return new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });
}

/** The strings and number literals of a line JSON.parse took (a string is skipped whole). */
const STRINGS_AND_NUMBERS = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g;

/**
 * Whether `value` (what JSON.parse made) holds a number that is not finite: a walk with a
 * stack of its own (JSON.parse takes lines nested 100,000 deep), a typeof a value; no
 * reviver, which costs a call a value (3 times JSON.parse's time on a 190-byte message
 * line, 4 to 5 times on 2,000 floats or 500 objects; this walk: within noise on the
 * first, up to +30% on 500 objects).
 */
function holdsNonFinite(value) {
  const stack = [value];
  while (stack.length > 0) {
    const item = stack.pop();
    if (typeof item === 'number') {
      if (!Number.isFinite(item)) return true;
    } else if (item !== null && typeof item === 'object') {
      if (Array.isArray(item)) {
        for (let i = 0; i < item.length; i += 1) stack.push(item[i]);
      } else {
        for (const key of Object.keys(item)) stack.push(item[key]);
      }
    }
  }
  return false;
}

/**
 * JSON.parse of an input line, as strict as the kernel and the Python bridge read it: a
 * number too large for a double (`1e999`, `1` and 400 zeros), which JSON.parse reads as
 * Infinity, makes the line not JSON ("number out of range", serde_json's and the Python
 * bridge's words), not a handler given Infinity, which no answer can hold. `1e-999` reads
 * as 0. Throws a SyntaxError as JSON.parse does.
 */
function parseJSON(text) {
  const value = JSON.parse(text);
  if (holdsNonFinite(value)) {
    let shown = '';
    for (const [literal] of text.matchAll(STRINGS_AND_NUMBERS)) {
      if (literal.charCodeAt(0) !== 0x22 && !Number.isFinite(Number(literal))) {
        shown = literal.length <= 40 ? literal : `${literal.slice(0, 40)}...`;
        break;
      }
    }
    const error = new SyntaxError(`number out of range: ${shown}`);
    // (what JSON.parse read, for a message frame to be answered: see messagePayload)
    error.parsed = value;
    throw error;
  }
  return value;
}

/** The payload of what JSON.parse read if it is a `message` frame's object payload, else null. */
function messagePayload(frame) {
  if (frame === null || typeof frame !== 'object' || frame.type !== 'message') return null;
  const payload = frame.payload;
  return payload !== null && typeof payload === 'object' && !Array.isArray(payload) ? payload : null;
}

/** Message kinds, spelled as on the wire (the original bridge's MessageKind). */
const MessageKind = Object.freeze({
  COMMAND: 'Command',
  EVENT: 'Event',
  QUERY: 'Query',
  RESPONSE: 'Response',
});

/**
 * A message as the handler sees it: every field of the wire object (from, to, kind,
 * payload, timestamp, id, conversation_id, reply_to, trace_id), plus reply() as in the
 * original bridge.
 */
class Message {
  constructor(fields = {}) {
    Object.assign(this, fields);
    if (this.timestamp === undefined) this.timestamp = new Date().toISOString();
  }

  /**
   * The Response to this message, as the original bridge built it: reply(this.id, payload).
   * (A handler answers by returning the payload itself: a Message it returns is the payload.)
   */
  reply(senderId, payload) {
    if (typeof senderId !== 'string') {
      // reply(payload) made a Response "from" the payload, with no payload, without a word.
      throw new TypeError(
        `message.reply(senderId, payload) takes the answering agent's id first, as in the` +
          ` original bridge: message.reply(this.id, payload); got ${typeName(senderId)}` +
          ` (to answer a message, return the payload itself from handleMessage)`
      );
    }
    const fields = {
      from: senderId,
      to: this.from,
      kind: MessageKind.RESPONSE,
      payload,
      timestamp: new Date().toISOString(),
    };
    if (this.conversation_id) fields.conversation_id = this.conversation_id;
    if (this.trace_id) fields.trace_id = this.trace_id;
    return new Message(fields);
  }

  toJSON() {
    return { ...this };
  }
}

/** An input line that is not a frame this bridge understands (reported, then skipped). */
class InvalidFrame extends Error {
  constructor(problem, message = null) {
    super(problem);
    this.name = 'InvalidFrame';
    // Set for a `message` frame with bad fields: it still gets an error answer.
    this.frameMessage = message;
  }
}

/**
 * A NEXUS_* environment variable the agent was started with has a value it cannot use
 * (`variable` names it, `value` is what it held): thrown by NexusAgent's constructor.
 * A RangeError, as before it had a name of its own; runMain reports it in one line on
 * stderr and exits 2.
 */
class BadEnvironment extends RangeError {
  constructor(variable, value, problem) {
    super(`${variable} ${problem}, got ${JSON.stringify(value)}`);
    this.name = 'BadEnvironment';
    this.variable = variable;
    this.value = value;
  }
}

class NotSerialisable extends TypeError {}

function typeName(value) {
  if (value === null) return 'null';
  if (typeof value === 'object') {
    // (a thrown object's own 'constructor' field may name it with anything: a string only)
    const name = value.constructor && value.constructor.name;
    return typeof name === 'string' && name ? name : 'Object';
  }
  return typeof value;
}

const LONE_SURROGATES = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/**
 * `text` with each lone surrogate written as its escape (`\udfff`, as Python's
 * backslashreplace does): a frame cannot carry one (not Unicode text), and an error's
 * text may hold one (a string cut by length: 'x😀'.slice(0, 2)).
 */
function wellFormed(text) {
  return text.replace(LONE_SURROGATES, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}

/**
 * What a handler threw, as an error frame says it: { text, errorType, logged } (the
 * stderr line's text; and isError, message). Never throws: JavaScript throws anything, a Symbol (which
 * String() refuses in a template), an object whose toString, or an Error whose message,
 * name or stack getter throws, a Proxy whose every trap does; the error frame is written
 * all the same, and the agent goes on.
 */
function describeThrown(err, depth = 0) {
  const attempt = (read, fallback) => {
    try {
      return read();
    } catch (inner) {
      return fallback;
    }
  };
  const kind = typeof err;
  const isError = attempt(() => err instanceof Error, false);
  const field = (name) => attempt(() => {
    const value = err[name];
    return typeof value === 'string' ? value : undefined;
  }, undefined);
  const unreadable = `<a thrown ${kind} whose text could not be read>`;
  const shown = attempt(() => String(err), unreadable); // (String(symbol) is its description)
  const name = isError ? field('name') : undefined;
  const errorType = name && name !== 'Error' ? name : attempt(() => typeName(err), kind);
  const message = isError ? field('message') : undefined;
  const own = isError ? message || name || errorType : shown;
  const logged = (kind === 'object' || kind === 'function') && err !== null ? field('stack') || shown : shown;
  const inner = isError && depth < GROUP_DEPTH ? attempt(() => innerErrors(err, depth), '') : '';
  return {
    isError,
    message: message && wellFormed(message),
    text: wellFormed(inner ? `${own} ${inner}` : own),
    errorType: wellFormed(errorType),
    logged: inner ? `${logged}\n  ${inner}` : logged,
  };
}

// how many of an AggregateError's errors its error text names, and how deep in
// aggregates inside aggregates: as the Python bridge names an exception group's
// exceptions (as CPython's traceback shows a group: max_group_width 15, max_group_depth 10)
const GROUP_WIDTH = 15;
const GROUP_DEPTH = 10;

/**
 * The errors of an AggregateError (a Promise.any that every promise rejected) as its
 * error text names them, '(2 errors): [TypeError: a; Error: b]', at most GROUP_WIDTH
 * (then 'and 3 more'), none past ERROR_TEXT_LIMIT characters in all, each cut at it;
 * '' for any other error. Its message alone said nothing of what failed.
 */
function innerErrors(err, depth) {
  if (!isInstance(err, AggregateError)) return '';
  const errors = err.errors;
  if (!Array.isArray(errors) || errors.length === 0) return '';
  const parts = [];
  let length = 0;
  for (const member of errors.slice(0, GROUP_WIDTH)) {
    if (length > ERROR_TEXT_LIMIT) break;
    const described = describeThrown(member, depth + 1);
    const part = cutErrorText(`${described.errorType}: ${described.text}`);
    parts.push(part);
    length += part.length;
  }
  const more = errors.length - parts.length;
  if (more > 0) parts.push(`and ${more.toLocaleString('en-US')} more`);
  const count = errors.length === 1 ? '1 error' : `${errors.length.toLocaleString('en-US')} errors`;
  return `(${count}): [${parts.join('; ')}]`;
}

/** `value instanceof cls`, false where asking throws (a Proxy's getPrototypeOf trap). */
function isInstance(value, cls) {
  try {
    return value instanceof cls;
  } catch (err) {
    return false;
  }
}

/**
 * JSON.stringify that refuses what JSON cannot carry instead of silently dropping it.
 * Throws NotSerialisable and nothing else.
 */
/** The most arrays and objects `nesting` enters before it gives up (undefined). */
const NESTING_WALK_LIMIT = 200_000;

/**
 * How deep `value` nests its arrays and objects (`[]` is 1), without recursion (it is
 * asked of a value that overflowed JSON.stringify's stack), each entered once; null if
 * it holds itself, undefined if it could not be read (a Proxy whose traps throw) or is
 * not what JSON.stringify wrote: one with a toJSON method (JSON.stringify writes what it
 * returns, which may hold the object again without end), or one past NESTING_WALK_LIMIT
 * arrays and objects (a getter or Proxy trap that gives a new object each time: until
 * the fifty-fourth pass's review walked until the heap ran out, 43 s to a crash at a
 * 512 MB heap; 2 s to give up now). JSON.stringify overflows near 4,200 levels.
 */
function nesting(value) {
  const isContainer = (item) => item !== null && typeof item === 'object';
  try {
    if (!isContainer(value)) return 0;
    if (typeof value.toJSON === 'function') return undefined;
    let entered = 1;
    const path = [Object.values(value)[Symbol.iterator]()];
    const onPath = [value];
    const inPath = new Set(onPath);
    // the levels each one walked holds ([] is 1), kept: one met again (held in two
    // places) is as deep under each place as JSON.stringify writes it there
    const height = new Map();
    const below = [0]; // for each one on the path: the most levels of one inside it
    while (path.length > 0) {
      const step = path[path.length - 1].next();
      if (step.done) {
        path.pop();
        const left = onPath.pop();
        inPath.delete(left);
        const levels = below.pop() + 1;
        height.set(left, levels);
        if (below.length > 0) below[below.length - 1] = Math.max(below[below.length - 1], levels);
        continue;
      }
      const item = step.value;
      if (!isContainer(item)) continue;
      if (height.has(item)) {
        below[below.length - 1] = Math.max(below[below.length - 1], height.get(item));
        continue;
      }
      if (inPath.has(item)) return null;
      entered += 1;
      if (typeof item.toJSON === 'function' || entered > NESTING_WALK_LIMIT) return undefined;
      inPath.add(item);
      onPath.push(item);
      path.push(Object.values(item)[Symbol.iterator]());
      below.push(0);
    }
    return height.get(value);
  } catch (err) {
    return undefined;
  }
}

function encode(obj, subject = obj) {
  let text;
  try {
    text = JSON.stringify(obj, (key, value) => {
      const kind = typeof value;
      if (kind === 'bigint' || kind === 'function' || kind === 'symbol') {
        throw new NotSerialisable(kind);
      }
      if (kind === 'number' && !Number.isFinite(value)) {
        throw new NotSerialisable(`number (${value})`);
      }
      if (value instanceof Map || value instanceof Set) {
        throw new NotSerialisable(value.constructor.name);
      }
      return value;
    });
  } catch (err) {
    // (the result's own code may throw anything, a Proxy whose every trap throws too: an
    // instanceof of it, or reading its message, throws, so describeThrown reads it)
    const thrown = describeThrown(err);
    if (thrown.isError && isInstance(err, NotSerialisable)) throw err;
    if (thrown.isError && isInstance(err, TypeError) && /circular/i.test(thrown.message || '')) {
      throw new NotSerialisable('circular structure');
    }
    if (thrown.isError && isInstance(err, RangeError) && /call stack/i.test(thrown.message || '')) {
      // (the stack overflowed: said as the Python bridge says a result nested too deeply)
      const depth = nesting(subject);
      if (depth === null) throw new NotSerialisable('circular structure');
      if (depth !== undefined) {
        const levels = depth.toLocaleString('en-US');
        throw new NotSerialisable(`nested ${levels} levels deep, past the JSON writer's recursion limit`);
      }
    }
    throw new NotSerialisable(`${thrown.errorType}: ${thrown.text}`);
  }
  // JSON.stringify escapes a lone surrogate ('\ud800', half of a pair: 'x😀'.slice(0, 2))
  // as \ud800, and the kernel refuses such a line (not Unicode text): a response would
  // fail its message as malformed, a send the message being handled.
  if (text.includes('\\ud') && LONE_SURROGATE_ESCAPE.test(text)) {
    throw new NotSerialisable(`${loneSurrogatePlace(subject)} (half of a surrogate pair: not Unicode text)`);
  }
  return text;
}

/** An escaped surrogate in JSON text (after an even number of backslashes, if any). */
const LONE_SURROGATE_ESCAPE = /(?<!\\)(?:\\\\)*\\ud[89a-f]/;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/**
 * Where in `obj` the first string (or key) holding a lone surrogate is, in the words of
 * an error: 'string with a lone surrogate at .a[1]', 'key with a lone surrogate in .b'.
 */
function loneSurrogatePlace(obj) {
  const where = (path) => (path === '' ? '.' : path.startsWith('[') ? `.${path}` : path);
  const walk = (value, path) => {
    if (typeof value === 'string') {
      return LONE_SURROGATE.test(value) ? `string with a lone surrogate at ${where(path)}` : null;
    }
    if (value === null || typeof value !== 'object') return null;
    if (typeof value.toJSON === 'function') return walk(value.toJSON(), path);
    if (Array.isArray(value)) {
      for (let i = 0; i < value.length; i += 1) {
        const found = walk(value[i], `${path}[${i}]`);
        if (found !== null) return found;
      }
      return null;
    }
    for (const key of Object.keys(value)) {
      if (LONE_SURROGATE.test(key)) return `key with a lone surrogate in ${where(path)}`;
      const place = /^[A-Za-z_$][\w$]*$/.test(key) ? `${path}.${key}` : `${path}[${JSON.stringify(key)}]`;
      const found = walk(value[key], place);
      if (found !== null) return found;
    }
    return null;
  };
  return walk(obj, '') || 'string with a lone surrogate';
}

function protocolFrom(value, source) {
  const text = String(value).trim();
  if (text !== '1' && text !== '2') {
    if (source.startsWith('NEXUS_')) throw new BadEnvironment(source, value, 'must be 1 or 2');
    throw new RangeError(`${source} must be 1 or 2, got ${JSON.stringify(value)}`);
  }
  return Number(text);
}

/** The highest version the kernel speaks (NEXUS_KERNEL_PROTOCOL); a later one is fine. */
function kernelProtocolFrom(value) {
  const text = String(value).trim();
  if (!/^[0-9]+$/.test(text) || Number(text) < 1) {
    throw new BadEnvironment('NEXUS_KERNEL_PROTOCOL', value, 'must be a protocol version (1, 2, ...)');
  }
  return Number(text);
}

/**
 * Base class for an agent that runs as a child process of a nexus_trio kernel.
 *
 * Options: name (else NEXUS_AGENT_NAME, else the class's static defaultName, else the class
 * name), id (else NEXUS_AGENT_ID, else a fresh UUID), protocol 1|2 (else NEXUS_PROTOCOL,
 * else 2; at most the kernel's NEXUS_KERNEL_PROTOCOL, the highest version both sides speak),
 * input/output/errorOutput streams (default: the process's own).
 * Protocol 1 is the original Nexus wire format: no `protocol` in `register`, responses
 * without `id`/`reply_to`, errors as a response payload {error, error_type}, no ping/send.
 */
class NexusAgent {
  constructor(options = {}, originalId = undefined) {
    if (typeof options === 'string') {
      // The original bridge's signature: new MyAgent(name[, id]).
      options = { name: options, id: originalId };
    }
    options = options || {};
    const env = process.env;
    this.name =
      options.name || env.NEXUS_AGENT_NAME || this.constructor.defaultName || this.constructor.name;
    const id = options.id || env.NEXUS_AGENT_ID || crypto.randomUUID();
    if (!UUID_RE.test(id)) {
      if (!options.id) throw new BadEnvironment('NEXUS_AGENT_ID', id, 'must be a UUID');
      throw new RangeError(`id must be a UUID, got ${JSON.stringify(id)}`);
    }
    this.id = id.toLowerCase();
    if (options.protocol !== undefined && options.protocol !== null) {
      this.protocol = protocolFrom(options.protocol, 'protocol');
    } else if (env.NEXUS_PROTOCOL) {
      this.protocol = protocolFrom(env.NEXUS_PROTOCOL, 'NEXUS_PROTOCOL');
    } else {
      this.protocol = PROTOCOL_VERSION;
    }
    if (env.NEXUS_KERNEL_PROTOCOL) {
      // A kernel that speaks only an earlier version gets that one (what it would run the
      // agent as anyway), so the agent's own checks (send(), ping) follow it.
      this.protocol = Math.min(this.protocol, kernelProtocolFrom(env.NEXUS_KERNEL_PROTOCOL));
    }
    this._input = options.input || process.stdin;
    this._output = options.output || null;
    this._errorOutput = options.errorOutput || process.stderr;
    this._write = null;
    this._lineNumber = 0;
    this.handled = 0;
    this.failed = 0;
    this.invalidLines = 0;
    // Lines log() could not write (stderr on a full disk, or closed).
    this.linesNotLogged = 0;
    this._stopping = undefined;
    this._currentId = null;
    this._controller = null;
    this._earlyCancels = [];
    this._peekDecoder = lineDecoder(); // (see _peekCancel)
  }

  /**
   * The AbortSignal of the message being handled: aborted when the kernel cancels it
   * (protocol 2: handle timeout, request timeout). Pass it to fetch() and the like.
   */
  get signal() {
    return this._controller === null ? null : this._controller.signal;
  }

  /** True once the kernel cancelled the message being handled. */
  get cancelled() {
    return this._controller !== null && this._controller.signal.aborted;
  }

  /** Handle one message (the wire object); return (or resolve to) the response payload. */
  handleMessage(message) {
    return null;
  }

  /** Called once after `register` was sent, before the first message. */
  onStart() {}

  /** Called once on `shutdown` or at the end of input. */
  onStop() {}

  /** Send a message to another agent (id or name) through the kernel (protocol 2). */
  send(to, payload, kind = 'Command', options = {}) {
    if (this.protocol < 2) {
      throw new Error('send() needs protocol 2; this agent speaks protocol 1');
    }
    if (typeof to !== 'string' || to === '') {
      throw new TypeError(`send(): 'to' must be an agent id or name, got ${JSON.stringify(to)}`);
    }
    if (!KINDS.includes(kind)) {
      throw new RangeError(`send(): unknown kind ${JSON.stringify(kind)} (expected one of ${KINDS.join(', ')})`);
    }
    const frame = { to, kind, payload };
    // Checked here: the kernel treats a send frame with a bad id as an invalid line, which
    // fails the message being handled.
    const { conversationId, traceId } = options;
    if (conversationId !== undefined && conversationId !== null) {
      if (!UUID_RE.test(String(conversationId))) {
        throw new TypeError(`send(): conversationId must be a UUID, got ${JSON.stringify(conversationId)}`);
      }
      frame.conversation_id = String(conversationId).toLowerCase();
    }
    if (traceId !== undefined && traceId !== null) {
      // A trace id is free text (the original's Option<String>): kept as given.
      if (typeof traceId !== 'string') {
        throw new TypeError(`send(): traceId must be a string, got ${JSON.stringify(traceId)}`);
      }
      frame.trace_id = traceId;
    }
    let line;
    try {
      line = encode({ type: 'send', payload: frame }, payload);
    } catch (err) {
      throw new TypeError(`send() payload is not JSON serialisable: ${err.message}`);
    }
    this._writeLine(line);
  }

  /** Write one line to stderr (the kernel logs it with this agent's fields). */
  /**
   * Write one line to stderr (the kernel logs it with this agent's fields). A line stderr
   * cannot take (a full disk, a closed pipe) is lost, counted in `linesNotLogged`: a
   * diagnostic that cannot be written does not stop the agent.
   */
  log(text) {
    const output = this._errorOutput;
    if (!this._watchingErrorOutput && typeof output.on === 'function') {
      // (a write to a pipe fails later, as an 'error' event: unheard, it ends the process)
      this._watchingErrorOutput = true;
      output.on('error', () => {
        this.linesNotLogged += 1;
      });
    }
    try {
      output.write(`${text}\n`);
    } catch (err) {
      this.linesNotLogged += 1;
    }
  }

  /**
   * Register, serve messages until `shutdown` or end of input, then run onStop.
   * Resolves to the exit code (0 clean, 1 if onStop threw). When the agent uses the
   * process's own stdout, the process exits with that code once stdout is flushed.
   */
  async runAgent() {
    const ownStdout = this._output === null;
    const restore = this._claimStdout();
    try {
      this._writeFrame('register', this._registerPayload());
      await this.onStart();
      await this._serve();
    } catch (err) {
      restore();
      throw err;
    }
    const code = await this._stopOnce();
    if (ownStdout) {
      // Leave even if user code keeps timers or sockets open; the empty write's callback
      // runs once everything written before it has reached the pipe. Stderr too: Node
      // writes to a pipe asynchronously, and process.exit() drops what is still queued.
      this._write('', () => exitFlushed(code, this._errorOutput));
    } else {
      restore();
    }
    return code;
  }

  /** Run onStop exactly once; resolves to the exit code (0, or 1 if onStop threw). */
  _stopOnce() {
    if (this._stopping === undefined) {
      this._stopping = (async () => {
        try {
          await this.onStop();
          return 0;
        } catch (err) {
          this.log(`nexus-bridge[${this.name}]: onStop failed: ${describeThrown(err).logged}`);
          return 1;
        }
      })();
    }
    return this._stopping;
  }

  _registerPayload() {
    const payload = { id: this.id, name: this.name };
    if (this.protocol >= 2) {
      payload.protocol = this.protocol;
      payload.features = [...FEATURES];
    }
    return payload;
  }

  _claimStdout() {
    if (this._output !== null) {
      const output = this._output;
      this._write = output.write.bind(output);
      return () => {};
    }
    const stdout = process.stdout;
    const original = stdout.write;
    this._write = original.bind(stdout);
    // The kernel closed our stdout (EPIPE): nobody can receive answers any more; stop.
    // Any other error (ENOSPC: a full disk) lost what was written: stop with status 1.
    let failed = false;
    stdout.on('error', (err) => {
      if (failed) return;
      failed = true;
      const why = err.code || err.message;
      if (err.code === 'EPIPE') {
        this.log(`nexus-bridge[${this.name}]: the kernel stopped reading stdout (${why}); stopping`);
        this._stopOnce().then((code) => exitFlushed(code, this._errorOutput));
      } else {
        this.log(`nexus-bridge[${this.name}]: cannot write to stdout (${why}); stopping`);
        this._stopOnce().then(() => exitFlushed(1, this._errorOutput));
      }
    });
    // console.log and stray writes go to stderr so they cannot corrupt the frame stream.
    stdout.write = (...args) => process.stderr.write(...args);
    return () => {
      stdout.write = original;
    };
  }

  /** The input split into lines (Buffers without their newline). */
  async *_rawLines() {
    // The start of a line that spans chunks, kept as its chunks and joined once, when its
    // newline comes: only a new chunk can hold it, so a long line is scanned once, and
    // copied once (joined a chunk at a time, a 30 MB line was copied 460 times: 22 s).
    let parts = [];
    let partsLength = 0;
    for await (const data of this._input) {
      let chunk = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
      let newline = chunk.indexOf(10);
      while (newline !== -1) {
        const end = chunk.subarray(0, newline);
        yield parts.length === 0 ? end : Buffer.concat([...parts, end], partsLength + newline);
        parts = [];
        partsLength = 0;
        chunk = chunk.subarray(newline + 1);
        newline = chunk.indexOf(10);
      }
      if (chunk.length > 0) {
        parts.push(chunk);
        partsLength += chunk.length;
      }
    }
    if (partsLength > 0) yield Buffer.concat(parts, partsLength);
  }

  async _serve() {
    const decoder = lineDecoder();
    try {
      if (this.protocol < 2) {
        // Each line is handled to completion before the next one is read: one message
        // at a time, and the stream pauses while a handler runs.
        for await (const raw of this._rawLines()) {
          if ((await this._onLine(raw, decoder)) === 'shutdown') return;
        }
        return;
      }
      // Protocol 2 reads on while a handler runs, so that a cancel frame is seen at once;
      // the lines are still handled one at a time, in order.
      const lines = [];
      let buffered = 0; // bytes in lines
      let ended = false;
      let stopped = false;
      let failure = null;
      let wake = null;
      let drained = null;
      const notify = () => {
        if (wake !== null) {
          const resolve = wake;
          wake = null;
          resolve();
        }
      };
      (async () => {
        try {
          for await (const raw of this._rawLines()) {
            if (stopped) break;
            this._peekCancel(raw);
            lines.push(raw);
            buffered += raw.length;
            notify();
            // Not one more chunk while READ_AHEAD bytes wait: the stream, then the pipe
            // fill up, and the writer waits.
            while (buffered >= READ_AHEAD && !stopped) {
              await new Promise((resolve) => {
                drained = resolve;
              });
            }
            if (stopped) break;
          }
        } catch (err) {
          failure = err;
        } finally {
          ended = true;
          notify();
        }
      })();
      try {
        for (;;) {
          while (lines.length > 0) {
            const raw = lines.shift();
            buffered -= raw.length;
            if (drained !== null && buffered < READ_AHEAD) {
              const resolve = drained;
              drained = null;
              resolve();
            }
            if ((await this._onLine(raw, decoder)) === 'shutdown') return;
          }
          if (failure !== null) throw failure;
          if (ended) return;
          await new Promise((resolve) => {
            wake = resolve;
          });
        }
      } finally {
        // Done (shutdown, end of input): stop reading, and let go of the input as the
        // protocol-1 loop does when it returns, or an agent run in-process would be kept
        // alive by a stream nobody reads any more.
        stopped = true;
        if (drained !== null) drained();
        if (!ended && typeof this._input.destroy === 'function') this._input.destroy();
      }
    } finally {
      if (this._input === process.stdin) process.stdin.pause();
    }
  }

  /** A cancel frame takes effect when it is read (the main loop only skips it). */
  _peekCancel(raw) {
    if (!raw.includes('"cancel"')) return;
    let target;
    try {
      // read as _onLine reads lines (toString would replace bytes that are not UTF-8:
      // a cancel the main loop skips would still cancel)
      const frame = parseJSON(this._peekDecoder.decode(raw));
      target = frame.type === 'cancel' ? frame.payload.message_id : undefined;
    } catch (err) {
      return; // not a usable cancel frame: the main loop reports the line
    }
    if (typeof target !== 'string') return;
    if (this._controller !== null && target === this._currentId) {
      this._controller.abort();
    } else {
      this._earlyCancels.push(target);
      if (this._earlyCancels.length > EARLY_CANCELS) this._earlyCancels.shift();
    }
  }

  async _onLine(raw, decoder) {
    this._lineNumber += 1;
    let frame;
    try {
      let line;
      try {
        line = decoder.decode(raw);
      } catch (err) {
        throw new InvalidFrame(`not UTF-8 (${utf8Problem(raw)})`);
      }
      line = line.replace(/\r$/, '');
      if (line.trim() === '') return null;
      frame = this._parse(line);
    } catch (err) {
      if (!(err instanceof InvalidFrame)) throw err;
      this._report(err.message);
      if (err.frameMessage !== null) {
        this._sendError(err.frameMessage, err.message, 'InvalidFrame');
      }
      return null;
    }
    if (frame.type === 'message') {
      await this._onMessage(new Message(frame.payload));
    } else if (frame.type === 'ping') {
      this._writeFrame('pong', { id: frame.payload.id });
    }
    return frame.type;
  }

  _parse(line) {
    if (line.charCodeAt(0) === 0xfeff) {
      // (in the words of Python's json, which the Python bridge and the kernel use)
      throw new InvalidFrame(`not JSON (${BOM_PROBLEM}): ${JSON.stringify(line.slice(0, SNIPPET))}`);
    }
    let frame;
    try {
      frame = parseJSON(line);
    } catch (err) {
      // A message frame read whole but for a number no double holds (an integer of 400
      // digits, which the kernel writes for a Python int) is answered, as one with bad
      // fields is: skipped unanswered, its message waited out the handle timeout, and the
      // child, which never saw it, was replaced for not answering its cancel.
      throw new InvalidFrame(
        `not JSON (${err.message}): ${JSON.stringify(line.slice(0, SNIPPET))}`,
        messagePayload(err.parsed),
      );
    }
    if (frame === null || typeof frame !== 'object' || Array.isArray(frame)) {
      throw new InvalidFrame(`a frame must be a JSON object, got ${Array.isArray(frame) ? 'array' : typeName(frame)}`);
    }
    if (typeof frame.type !== 'string') {
      throw new InvalidFrame(`frame has no string 'type': ${JSON.stringify(line.slice(0, SNIPPET))}`);
    }
    const payload = frame.payload;
    if (frame.type === 'shutdown') return frame;
    if (frame.type === 'message') {
      this._checkMessage(payload);
      return frame;
    }
    if (frame.type === 'ping' && this.protocol >= 2) {
      if (payload === null || typeof payload !== 'object' || typeof payload.id !== 'string') {
        throw new InvalidFrame("ping frame needs a payload with a string 'id'");
      }
      return frame;
    }
    if (frame.type === 'cancel' && this.protocol >= 2) {
      if (payload === null || typeof payload !== 'object' || typeof payload.message_id !== 'string') {
        throw new InvalidFrame("cancel frame needs a payload with a string 'message_id'");
      }
      return frame;
    }
    throw new InvalidFrame(`unknown frame type ${JSON.stringify(frame.type)}`);
  }

  _checkMessage(payload) {
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw new InvalidFrame('message frame needs an object payload');
    }
    const missing = MESSAGE_FIELDS.filter((key) => !(key in payload));
    let problem = null;
    if (missing.length > 0) problem = `missing field(s) ${missing.join(', ')}`;
    else if (typeof payload.from !== 'string') problem = "field 'from' must be a string";
    else if (!KINDS.includes(payload.kind)) problem = `unknown kind ${JSON.stringify(payload.kind)}`;
    if (problem !== null) throw new InvalidFrame(`invalid message frame: ${problem}`, payload);
  }

  _report(problem) {
    this.invalidLines += 1;
    this.log(`nexus-bridge[${this.name}]: skipped input line ${this._lineNumber}: ${problem}`);
  }

  async _onMessage(message) {
    this._currentId = typeof message.id === 'string' ? message.id : null;
    this._controller = new AbortController();
    const early = this._currentId === null ? -1 : this._earlyCancels.indexOf(this._currentId);
    if (early !== -1) {
      this._earlyCancels.splice(early, 1);
      this._controller.abort();
    }
    try {
      await this._handleCurrent(message);
    } finally {
      this._currentId = null;
      this._controller = null;
    }
  }

  async _handleCurrent(message) {
    if (this.cancelled) {
      // Cancelled before it was started (say during a slow onStart): not handled.
      this.failed += 1;
      this._sendError(message, 'cancelled by the kernel', 'Cancelled');
      return;
    }
    let result;
    try {
      result = await this.handleMessage(message);
    } catch (err) {
      this.failed += 1;
      if (this.cancelled) {
        // The kernel gave up on it: one line, not a stack, and still one answer.
        this.log(`nexus-bridge[${this.name}]: message ${message.id} cancelled`);
        const text = describeThrown(err).message || 'cancelled by the kernel';
        this._sendError(message, text, 'Cancelled');
        return;
      }
      // (a subclass of Error keeps name 'Error' unless it sets one: its class names it)
      const thrown = describeThrown(err);
      this.log(`nexus-bridge[${this.name}]: handleMessage failed: ${thrown.logged}`);
      this._sendError(message, thrown.text, thrown.errorType);
      return;
    }
    let line;
    try {
      const answer = result === undefined ? null : result;
      line = encode({ type: 'response', payload: this._response(message, answer) }, answer);
    } catch (err) {
      // Only the handler's result can fail to encode: every other field is a string.
      this.failed += 1;
      const text = `result of handleMessage is not JSON serialisable: ${describeThrown(err).text}`;
      this.log(`nexus-bridge[${this.name}]: ${text}`);
      this._sendError(message, text, 'TypeError');
      return;
    }
    this.handled += 1;
    this._writeLine(line);
  }

  _response(message, payload) {
    const response = {
      from: this.id,
      to: message.from,
      kind: 'Response',
      payload,
      timestamp: new Date().toISOString(),
    };
    if (this.protocol >= 2) {
      const msgId = message.id === undefined ? null : message.id;
      response.id = crypto.randomUUID();
      if (msgId !== null) response.reply_to = msgId;
      response.conversation_id = message.conversation_id || msgId;
      response.trace_id = message.trace_id === undefined ? null : message.trace_id;
    } else {
      // As the original bridge did: echoed when set. The kernel matches answers to
      // messages by the conversation id it gave them.
      if (message.conversation_id) response.conversation_id = message.conversation_id;
      if (message.trace_id) response.trace_id = message.trace_id;
    }
    return response;
  }

  _sendError(message, text, errorType) {
    // (a 5 MB thrown text, or error name, made a frame over the kernel's line limit: the
    // message failed "malformed", the line discarded, not with the handler's error)
    text = cutErrorText(text);
    errorType = cutErrorText(errorType);
    if (this.protocol >= 2) {
      const msgId = message && message.id !== undefined ? message.id : null;
      this._writeFrame('error', { reply_to: msgId, error: text, error_type: errorType });
    } else {
      this._writeFrame('response', this._response(message || {}, { error: text, error_type: errorType }));
    }
  }

  _writeFrame(type, payload) {
    this._writeLine(encode({ type, payload }));
  }

  _writeLine(line) {
    if (this._write === null) {
      throw new Error('the agent is not running: call runAgent() first');
    }
    this._write(`${line}\n`);
  }
}

/**
 * Exit with `code` once everything written to `stream` (stderr) has left the process:
 * on a pipe Node writes asynchronously, and process.exit() drops what is still queued.
 */
function exitFlushed(code, stream = process.stderr) {
  if (stream && typeof stream.write === 'function' && !stream.destroyed) {
    stream.write('', () => process.exit(code));
  } else {
    process.exit(code);
  }
}

/** Answers every message with its payload, unchanged. */
class EchoAgent extends NexusAgent {
  handleMessage(message) {
    return message.payload;
  }
}
EchoAgent.defaultName = 'echo';

/** Run an agent class as the main program: reports bad options and exits 2. */
function runMain(AgentClass, options = {}) {
  let agent;
  try {
    agent = new AgentClass(options);
  } catch (err) {
    process.stderr.write(`nexus-bridge: ${describeThrown(err).text}\n`);
    process.exit(2);
  }
  agent.runAgent().catch((err) => {
    // (a Symbol, or a value whose text cannot be read, is said too: not a crash of this line)
    process.stderr.write(`nexus-bridge[${agent.name}]: ${describeThrown(err).logged}\n`);
    exitFlushed(1);
  });
  return agent;
}

/**
 * Run an agent instance (the original bridge's entry point): register, serve, exit.
 * A failure to start is reported on stderr and exits with status 1.
 */
function runAgent(agent) {
  return agent.runAgent().catch((err) => {
    process.stderr.write(`nexus-bridge[${agent.name}]: ${describeThrown(err).logged}\n`);
    exitFlushed(1);
  });
}

module.exports = {
  PROTOCOL_VERSION,
  FEATURES,
  KINDS,
  BadEnvironment,
  InvalidFrame,
  Message,
  MessageKind,
  NexusAgent,
  Agent: NexusAgent,
  EchoAgent,
  runAgent,
  runMain,
};

/** What the echo agent's command line says of `--name ""` (as the Python bridge's does). */
const EMPTY_NAME = "must not be empty (leave it out for the default: NEXUS_AGENT_NAME or 'echo')";

/** The echo agent's command line: the options of the Python bridge's, read the same way. */
function echoUsage(prog) {
  return `usage: ${prog} [-h] [--name NAME] [--protocol {1,2}]`;
}

function echoHelp(prog) {
  return `${echoUsage(prog)}

The Nexus stdio bridge for Node.js agents (Node 18+, no dependencies). Run as a
program, it is an echo agent: it registers with the kernel and answers every
message with its payload, in newline-delimited JSON on stdin and stdout
(docs/protocol.md). Under a kernel:
  nexus send 'node path/to/nexus-bridge.js' '{"hello": 1}'

options:
  -h, --help        show this help message and exit
  --name NAME       agent name (default: NEXUS_AGENT_NAME or 'echo')
  --protocol {1,2}  wire protocol version (default: NEXUS_PROTOCOL or 2)

As a library: const { NexusAgent, runMain } = require('./nexus-bridge.js');
subclass NexusAgent, override handleMessage(message) (may be async) and call
runMain(MyAgent). See docs/bridges.md.
`;
}

/**
 * The echo agent's options from its arguments: {options}, {help: true}, or {error} (the
 * text argparse gives the Python bridge for the same mistake).
 */
function parseEchoArguments(args) {
  const options = {};
  const unknown = [];
  for (let i = 0; i < args.length; i += 1) {
    const arg = args[i];
    if (arg === '-h' || arg === '--help') return { help: true };
    if (arg === '--') {
      unknown.push(...args.slice(i));
      break;
    }
    const option = /^--(name|protocol)(?:=([\s\S]*))?$/.exec(arg);
    if (option === null) {
      unknown.push(arg);
      continue;
    }
    let value = option[2];
    if (value === undefined) {
      value = args[i + 1];
      if (value === undefined || (value.startsWith('-') && value !== '-')) {
        return { error: `argument --${option[1]}: expected one argument` };
      }
      i += 1;
    }
    if (option[1] === 'name' && value === '') {
      return { error: `argument --name: ${EMPTY_NAME}` };
    }
    if (option[1] === 'protocol' && value !== '1' && value !== '2') {
      return { error: `argument --protocol: invalid choice: '${value}' (choose from '1', '2')` };
    }
    options[option[1]] = value;
  }
  if (unknown.length > 0) return { error: `unrecognized arguments: ${unknown.join(' ')}` };
  return { options };
}

if (require.main === module) {
  const prog = require('path').basename(process.argv[1]);
  const parsed = parseEchoArguments(process.argv.slice(2));
  if (parsed.help) {
    process.stdout.write(echoHelp(prog));
  } else if (parsed.error !== undefined) {
    process.stderr.write(`${echoUsage(prog)}\n${prog}: error: ${parsed.error}\n`);
    process.exitCode = 2;
  } else {
    runMain(EchoAgent, parsed.options);
  }
}
