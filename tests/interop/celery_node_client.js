// A caller in another language: celery-node asks numbering's worker for numbers through
// the plain Celery protocol (task "numbering.assign", keyword arguments sequence, key,
// count), on the sequence's queue, and reads the answers from the shared result backend.
// Usage: node celery_node_client.js BROKER_URL BACKEND_URL QUEUE SEQUENCE PREFIX COUNT
// Then freezes the sequence through the control queue, asks once more (refused), thaws it,
// and voids the last number (twice: the second answer says it is voided already).
// Prints one JSON line: {"numbers": [...], "resent": {...}, "refused": {...}, ...}.
"use strict";
const celery = require("celery-node");

async function main() {
  const [broker, backend, queue, sequence, prefix, count] = process.argv.slice(2);
  const client = celery.createClient(broker, backend, queue);
  const task = client.createTask("numbering.assign");
  const ask = (kwargs) => task.applyAsync([], kwargs).get(60000);
  const numbers = [];
  for (let i = 0; i < Number(count); i++) {
    numbers.push(await ask({ sequence, key: `${prefix}:${i}` }));
  }
  // The same key again: the number it already has, marked resent.
  const resent = await ask({ sequence, key: `${prefix}:0` });
  // A request numbering refuses (a block of 0): the task fails with the reason.
  const bad = task.applyAsync([], { sequence, key: `${prefix}:bad`, count: 0 });
  let refused = { task_id: bad.taskId };
  try {
    refused.answer = await bad.get(60000);
  } catch (error) {
    refused.error = String(error && error.message ? error.message : error);
  }
  // The control tasks travel on the control queue, consumed by every numbering worker.
  const control = celery.createClient(broker, backend, "numbering.control");
  const freeze = control.createTask("numbering.freeze");
  const frozen = await freeze.applyAsync([], { sequence, frozen: true }).get(60000);
  const whileFrozen = task.applyAsync([], { sequence, key: `${prefix}:frozen` });
  let frozenAnswer = { task_id: whileFrozen.taskId };
  try {
    frozenAnswer.answer = await whileFrozen.get(60000);
  } catch (error) {
    frozenAnswer.error = String(error && error.message ? error.message : error);
  }
  const thawed = await freeze.applyAsync([], { sequence, frozen: false }).get(60000);
  const voidTask = control.createTask("numbering.void");
  const last = { sequence, key: `${prefix}:${Number(count) - 1}`, reason: "invoice cancelled" };
  const voided = await voidTask.applyAsync([], last).get(60000);
  const voidedAgain = await voidTask.applyAsync([], last).get(60000);
  console.log(
    JSON.stringify({ numbers, resent, refused, frozen, frozenAnswer, thawed, voided, voidedAgain }),
  );
  control.disconnect();
  client.disconnect();
}

main().catch((error) => {
  console.error(String(error && error.stack ? error.stack : error));
  process.exit(1);
});
