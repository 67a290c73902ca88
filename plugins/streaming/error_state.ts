/**
 * The streaming plugin's error state, the base of its reader and writer: once
 * the stream has failed, every later request fails, saying why.
 *
 * @module
 */
import { NbdError } from "../errors.ts";

/**
 * A sticky failure: the first reason is kept and reported to every later
 * request, the first time as it is, then as the reason the stream stopped.
 *
 * @example
 * ```ts
 * import { ErrorState } from "./error_state.ts";
 * const state = new ErrorState();
 * state.fail("the reader went away");
 * state.fail("ignored: the first reason sticks");
 * console.assert(state.failure === "the reader went away");
 * ```
 */
export class ErrorState {
  #failure: string | null = null;
  #told = false;
  #onFailure: ((message: string) => void) | undefined;

  /**
   * Create the state.
   *
   * @param onFailure Called once, with the reason, when the state is entered.
   */
  constructor(onFailure?: (message: string) => void) {
    this.#onFailure = onFailure;
  }

  /** Why the stream stopped, or null while it works. */
  get failure(): string | null {
    return this.#failure;
  }

  /**
   * Enter the error state (the first reason sticks).
   *
   * @param message Why.
   */
  fail(message: string): void {
    if (this.#failure !== null) return;
    this.#failure = message;
    this.#onFailure?.(message);
  }

  /**
   * Throw the reason, if in the error state: as it is the first time, then
   * as the reason the stream stopped earlier.
   *
   * @throws {NbdError} EIO with the reason.
   */
  check(): void {
    if (this.#failure === null) return;
    const told = this.#told;
    this.#told = true;
    throw new NbdError(
      "EIO",
      told ? `The stream stopped earlier: ${this.#failure}` : this.#failure,
    );
  }
}
