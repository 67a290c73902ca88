/**
 * A promise-based mutual exclusion lock.
 *
 * @module
 */

/**
 * Runs functions one at a time, in call order.
 *
 * @example
 * ```ts
 * import { Mutex } from "./mutex.ts";
 * const m = new Mutex();
 * const order: number[] = [];
 * await Promise.all([m.run(async () => order.push(1)), m.run(() => order.push(2))]);
 * console.assert(order.join() === "1,2");
 * ```
 */
export class Mutex {
  #tail: Promise<unknown> = Promise.resolve();

  /**
   * Run `fn` once every earlier call has settled.
   *
   * @param fn The critical section.
   * @returns What `fn` returns.
   */
  run<T>(fn: () => T | Promise<T>): Promise<T> {
    const result = this.#tail.then(fn, fn);
    this.#tail = result.catch(() => {});
    return result;
  }

  /**
   * Take the lock until the returned function is called.
   *
   * @returns The release function.
   */
  async acquire(): Promise<() => void> {
    let release!: () => void;
    const held = new Promise<void>((resolve) => release = resolve);
    const before = this.#tail;
    this.#tail = before.then(() => held);
    await before;
    return release;
  }
}
