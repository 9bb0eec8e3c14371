-- Runs once, when the MariaDB data volume is first initialised (docker-entrypoint-initdb.d).
-- Keystone's schema and Dagster's storage live in separate databases. The entrypoint has
-- already created the `keystone` account (MARIADB_USER) with rights on MARIADB_DATABASE;
-- it also needs Dagster's database. Tables are created by migrations, not here.
CREATE DATABASE IF NOT EXISTS `keystone`
    CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
CREATE DATABASE IF NOT EXISTS `keystone_dagster`
    CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
GRANT ALL PRIVILEGES ON `keystone`.* TO 'keystone'@'%';
GRANT ALL PRIVILEGES ON `keystone_dagster`.* TO 'keystone'@'%';
FLUSH PRIVILEGES;
