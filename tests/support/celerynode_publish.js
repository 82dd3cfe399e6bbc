// Publishes Celery tasks with celery-node, as a Node.js producer would (tests/support/celerynode.py).
// stdin: {"broker": URL, "queue": NAME, "tasks": [{"name", "id", "args"?, "kwargs"?}]}.
// Exits 0 once every publish has completed; 1 with the error on stderr otherwise (RabbitMQ
// refusing celery-node's queue declaration with a 406, a broker that does not answer).
"use strict";

const fs = require("fs");
const { createClient } = require("celery-node");

function fail(error) {
  process.stderr.write(`celery-node: ${(error && (error.stack || error.message)) || error}\n`);
  process.exit(1);
}

process.on("unhandledRejection", fail);
process.on("uncaughtException", fail); // amqplib emits a channel's 406 as an "error" event
setTimeout(() => fail(new Error("no answer from the broker within 30 s")), 30000).unref();

async function main() {
  const input = JSON.parse(fs.readFileSync(0, "utf8"));
  const client = createClient(input.broker, input.broker, input.queue);
  const pending = [];
  // celery-node's Client.sendTaskMessage runs isReady().then(() => broker.publish(...)) and drops
  // the promise, so a caller can neither wait for the publish nor see it fail: the same chain,
  // with the same arguments, kept here.
  client.sendTaskMessage = (taskName, message) => {
    const { headers, properties, body } = message;
    pending.push(
      client
        .isReady()
        .then(() => client.broker.publish(body, "", client.conf.CELERY_QUEUE, headers, properties)),
    );
  };
  for (const task of input.tasks) {
    client.sendTask(task.name, task.args || [], task.kwargs || {}, task.id);
  }
  await Promise.all(pending);
  await client.disconnect();
}

main().then(() => process.exit(0), fail);
