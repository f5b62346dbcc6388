// Copies the IIFE into the server's console page (src/fonana_ws/web/console/), which ships in the Python
// package and so cannot load clients/js/dist at run time; tests/test_console.py checks the copy is exact.
import { copyFileSync } from 'node:fs';

const from = new URL('../dist/fonana.iife.min.js', import.meta.url);
const to = new URL('../../../src/fonana_ws/web/console/fonana.iife.min.js', import.meta.url);
copyFileSync(from, to);
console.log(`copied to ${to.pathname.replace(/.*\/src\//, 'src/')}`);
