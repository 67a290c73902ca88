/**
 * The version of nbdkit-ts, kept in one place (deno.json and the npm build read it from here).
 *
 * @module
 */

/** The version of nbdkit-ts. */
export const VERSION = "0.1.0";
