// Prints the bundle's size minified and gzipped (the number the README and the issue quote).
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

const file = new URL('../dist/fonana.iife.min.js', import.meta.url);
const min = readFileSync(file);
console.log(`fonana.iife.min.js: ${min.length} bytes minified, ${gzipSync(min, { level: 9 }).length} bytes gzipped`);
