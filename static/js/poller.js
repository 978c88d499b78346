// Long-polls one reply from a cursor, retrying with backoff, and hands over each new piece of text exactly once.

import { api, ApiError } from "./api.js";

const FIRST_RETRY_MS = 500;
const LONGEST_RETRY_MS = 10000;
// How long past the server's own hold a poll may take before we treat the connection as dead.
const WATCHDOG_GRACE_S = 15;
const SPIN_GUARD_MS = 250;

/** Returns the wait before retry number `failures` (1, 2, ...), with jitter. */
export function backoffDelay(failures, retryAfterSeconds = null) {
  const exponential = Math.min(LONGEST_RETRY_MS, FIRST_RETRY_MS * 2 ** Math.max(0, failures - 1));
  const jittered = exponential * (0.75 + Math.random() * 0.5);
  return retryAfterSeconds ? Math.max(jittered, retryAfterSeconds * 1000) : jittered;
}

/**
 * Follows one reply until it is final.
 *
 * handlers: onText(text), onAnswer(answer), onFinal(answer), onConnection(ok), onGone(error), onReset().
 */
export class ReplyPoller {
  constructor(messageId, handlers, { timeout = null } = {}) {
    this.messageId = messageId;
    this.handlers = handlers;
    this.timeout = timeout;
    this.cursor = "0";
    this.stopped = true;
    this.controller = null;
    this.wakeUp = null;
  }

  /** Starts polling from the given cursor ("0" means from the beginning). */
  start(cursor = "0") {
    this.cursor = String(cursor);
    this.stopped = false;
    this.loop();
    return this;
  }

  /** Stops polling at once; no handler is called afterwards. */
  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
    if (this.wakeUp) this.wakeUp();
  }

  sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.wakeUp = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  call(name, ...args) {
    if (!this.stopped && this.handlers[name]) this.handlers[name](...args);
  }

  async loop() {
    let failures = 0;
    let resets = 0;
    while (!this.stopped) {
      const requested = this.cursor;
      const controller = new AbortController();
      this.controller = controller;
      const watchdogSeconds = (this.timeout ?? 25) + WATCHDOG_GRACE_S;
      const watchdog = setTimeout(() => controller.abort(), watchdogSeconds * 1000);
      const startedAt = performance.now();
      let answer;
      try {
        answer = await api.poll(this.messageId, requested, this.timeout, controller.signal);
      } catch (error) {
        clearTimeout(watchdog);
        if (this.stopped) return;
        if (error instanceof ApiError && error.status === 404) {
          this.call("onGone", error);
          this.stopped = true;
          return;
        }
        if (error instanceof ApiError && error.status === 401) {
          this.stopped = true;
          return;
        }
        if (error instanceof ApiError && error.code === "bad_cursor" && resets < 3) {
          // The server no longer knows our cursor: start over and let the view drop its text.
          resets += 1;
          this.cursor = "0";
          this.call("onReset");
          continue;
        }
        failures += 1;
        this.call("onConnection", false);
        await this.sleep(backoffDelay(failures, error.retryAfter));
        continue;
      }
      clearTimeout(watchdog);
      if (this.stopped) return;
      if (failures) {
        failures = 0;
        this.call("onConnection", true);
      }
      // Only an answer to the cursor we hold may extend the text; anything else is stale.
      if (requested !== this.cursor || answer.id !== this.messageId) continue;
      this.cursor = String(answer.cursor);
      if (answer.text) this.call("onText", answer.text);
      this.call("onAnswer", answer);
      if (answer.done) {
        this.stopped = true;
        if (this.handlers.onFinal) this.handlers.onFinal(answer);
        return;
      }
      if (!answer.text && performance.now() - startedAt < SPIN_GUARD_MS) await this.sleep(SPIN_GUARD_MS);
    }
  }
}
