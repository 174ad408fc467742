#!/usr/bin/env node
/**
 * A JavaScript agent written for the original Nexus bridge API, running unchanged on ours.
 *
 * This is how the original README and article wrote an agent: extend NexusAgent, pass the
 * name to super(), write `async handleMessage(message)` that reads message.kind and
 * message.payload, and call runAgent(agent). It keeps a running list: a Command
 * {"item": "..."} adds an item and answers the new length; a Query answers the list; an
 * Event is counted and answered with nothing (null).
 *
 * Run it under the kernel: nexus run --spawn "node examples/original_javascript_agent.js"
 */

const path = require('path');
const { NexusAgent, MessageKind, runAgent } = require(
  path.join(__dirname, '../nexus_trio/bridges/nexus-bridge.js')
);

class ListAgent extends NexusAgent {
  constructor() {
    super('JSListKeeper');
    this.items = [];
    this.events = 0;
  }

  async handleMessage(message) {
    const { payload } = message;
    if (message.kind === MessageKind.EVENT) {
      this.events++;
      return null;
    }
    if (message.kind === MessageKind.QUERY) {
      return { items: this.items, events: this.events, agent: this.name };
    }
    if (message.kind === MessageKind.COMMAND) {
      if (!payload || typeof payload.item !== 'string') {
        return { error: "send a Command with an 'item' string", agent: this.name };
      }
      this.items.push(payload.item);
      return { length: this.items.length, agent: this.name };
    }
    return null;
  }

  async onStart() {
    console.error(`List keeper '${this.name}' started (ID: ${this.id})`);
  }

  async onStop() {
    console.error(`List keeper '${this.name}' stopped with ${this.items.length} items`);
  }
}

if (require.main === module) {
  const agent = new ListAgent();
  runAgent(agent);
}

module.exports = ListAgent;
