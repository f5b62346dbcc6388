/** The IIFE build's entry: the client and the adapter under one global `Fonana`. */
export * from './index.js';
export { WebSocketService, wsService } from './adapter.js';
